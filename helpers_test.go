package main

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A fakeClock is a clock that tests move by hand.
type fakeClock struct{ unix atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.unix.Store(1_700_000_000)
	return c
}

func (c *fakeClock) now() time.Time          { return time.Unix(c.unix.Load(), 0) }
func (c *fakeClock) advance(d time.Duration) { c.unix.Add(int64(d / time.Second)) }

// testPolicy is the Perl defaults.
var testPolicy = Policy{
	KnownIPLifetime: 7 * 24 * 3600,
	ResendWindow:    12 * 3600,
	MinResendDelay:  5 * 60,
}

// newTestGreylister returns a Greylister with the Perl defaults, a fake
// clock and the whitelist given as file text.
func newTestGreylister(t testing.TB, whitelist string) (*Greylister, *fakeClock) {
	t.Helper()
	wl, err := parseWhitelist(strings.NewReader(whitelist), "test-whitelist", nil)
	if err != nil {
		t.Fatal(err)
	}
	clock := newFakeClock()
	return NewGreylister(newTable(16, 100_000), testPolicy, wl, clock.now), clock
}

// req builds a request datagram with a final NUL after each field.
func req(ip, sender string, rcpts ...string) []byte {
	var b strings.Builder
	b.WriteString("I" + ip + "\x00F" + sender + "\x00")
	for _, r := range rcpts {
		b.WriteString("T" + r + "\x00")
	}
	return []byte(b.String())
}
