package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// A step is one request in a scenario: after moving the clock by wait, send
// datagram, and expect verdict want or error wantErr.
type step struct {
	wait     time.Duration
	datagram []byte
	want     Verdict
	wantErr  error
}

func runSteps(t *testing.T, g *Greylister, clock *fakeClock, steps []step) {
	t.Helper()
	var kb keyBuilder
	for i, s := range steps {
		clock.advance(s.wait)
		v, err := g.decideQmail(&kb, s.datagram)
		if s.wantErr != nil {
			if !errors.Is(err, s.wantErr) {
				t.Fatalf("step %d (%q): got verdict %04x, err %v; want error %v", i, s.datagram, v, err, s.wantErr)
			}
			continue
		}
		if err != nil || v != s.want {
			t.Fatalf("step %d (%q): got verdict %04x, err %v; want %04x (%s)", i, s.datagram, v, err, s.want, s.want.Event())
		}
	}
}

const (
	alice = "alice@sender.example"
	bob   = "bob@rcpt.example"
	carol = "carol@rcpt.example"
	verp  = "list-return-12-bob=example.com@lists.example.org"
)

// TestDecision walks through every row of PROTOCOL.md §3 and every
// consequence listed in §4.
func TestDecision(t *testing.T) {
	ip := "192.0.2.10"
	tests := []struct {
		name      string
		whitelist string
		steps     []step
	}{
		{"01 01 whitelisted", "192.0.2.0/24\n", []step{
			{0, req(ip, alice, bob), AcceptWhitelisted, nil},
			{0, req(ip, alice, bob), AcceptWhitelisted, nil},
		}},
		{"whitelisted client needs no sender", "192.0.2", []step{
			{0, []byte("I" + ip + "\x00garbage"), AcceptWhitelisted, nil},
		}},
		{"00 01 new then 00 02 too soon then 01 03 good retry then 01 02 known", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{time.Minute, req(ip, alice, bob), GreyTooSoon, nil},
			{3*time.Minute + 59*time.Second, req(ip, alice, bob), GreyTooSoon, nil},
			{time.Second, req(ip, alice, bob), AcceptRetried, nil},
			{0, req(ip, "other@sender.example", "dave@rcpt.example"), AcceptKnownIP, nil},
		}},
		{"known IP needs no sender", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{10 * time.Minute, req(ip, alice, bob), AcceptRetried, nil},
			{0, []byte("I" + ip + "\x00"), AcceptKnownIP, nil},
		}},
		{"known-IP lifetime slides", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{10 * time.Minute, req(ip, alice, bob), AcceptRetried, nil},
			{6 * 24 * time.Hour, req(ip, alice, carol), AcceptKnownIP, nil},
			{6 * 24 * time.Hour, req(ip, alice, carol), AcceptKnownIP, nil},
			{7*24*time.Hour - time.Second, req(ip, alice, carol), AcceptKnownIP, nil},
			{7 * 24 * time.Hour, req(ip, alice, carol), GreyNew, nil},
		}},
		{"00 03 stale restarts the clock", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{12 * time.Hour, req(ip, alice, bob), GreyStale, nil},
			{time.Minute, req(ip, alice, bob), GreyTooSoon, nil},
			{5 * time.Minute, req(ip, alice, bob), AcceptRetried, nil},
		}},
		{"one second inside the window is a good retry", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{12*time.Hour - time.Second, req(ip, alice, bob), AcceptRetried, nil},
		}},
		{"01 04 bounce rule with empty and dot sender", "", []step{
			{0, req(ip, "", verp), AcceptBounce, nil},
			{0, req(ip, ".", verp), AcceptBounce, nil},
			{0, req(ip, " ", verp), AcceptBounce, nil},
		}},
		{"bounce rule needs a null sender", "", []step{
			{0, req(ip, alice, verp), GreyNew, nil},
			{0, req(ip, "..", verp), GreyNew, nil},
		}},
		{"bounce rule needs - before =", "", []step{
			{0, req(ip, "", "bob=x-y@example.org"), GreyNew, nil},
		}},
		{"null sender without VERP is greylisted as '.'", "", []step{
			{0, req(ip, "", bob), GreyNew, nil},
			{6 * time.Minute, req(ip, ".", bob), AcceptRetried, nil},
		}},
		{"01 03 no recipients", "", []step{
			{0, req(ip, alice), AcceptRetried, nil},
			{0, []byte("I" + ip + "\x00F" + alice), AcceptRetried, nil},
		}},
		{"new + good retry answers 00 01 and makes the IP known", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{6 * time.Minute, req(ip, alice, bob, carol), GreyNew, nil},
			{0, req(ip, alice, "zed@rcpt.example"), AcceptKnownIP, nil},
		}},
		{"good retry + new also answers 00 01", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{6 * time.Minute, req(ip, alice, carol, bob), GreyNew, nil},
		}},
		{"same new recipient twice gives 00 02", "", []step{
			{0, req(ip, alice, bob, bob), GreyTooSoon, nil},
		}},
		{"new then bounce-rule recipient gives 01 04", "", []step{
			{0, req(ip, "", bob, verp), AcceptBounce, nil},
			// bob was recorded before the bounce rule stopped the loop.
			{0, req(ip, "", bob), GreyTooSoon, nil},
		}},
		{"bounce rule stops the loop", "", []step{
			{0, req(ip, "", verp, bob), AcceptBounce, nil},
			// bob was never examined, so it is new now.
			{0, req(ip, "", bob), GreyNew, nil},
		}},
		{"only a good retry makes an IP known", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{13 * time.Hour, req(ip, alice, bob), GreyStale, nil},
			{0, req(ip, "", verp), AcceptBounce, nil},
			{0, req(ip, alice, carol), GreyNew, nil},
		}},
		{"case and spaces do not matter in sender and recipient", "", []step{
			{0, req(ip, "Alice@Sender.Example", "BOB@rcpt.example"), GreyNew, nil},
			{6 * time.Minute, req(ip, "alice@sender.example", "b o b@RCPT.example"), AcceptRetried, nil},
		}},
		{"non-ASCII bytes are not case-folded", "", []step{
			{0, req(ip, alice, "\xc9@rcpt.example"), GreyNew, nil},
			{6 * time.Minute, req(ip, alice, "\xe9@rcpt.example"), GreyNew, nil},
		}},
		{"IPv6 text is canonicalised", "", []step{
			{0, req("2001:DB8::5", alice, bob), GreyNew, nil},
			{6 * time.Minute, req("2001:db8:0::5", alice, bob), AcceptRetried, nil},
			{0, req("2001:db8::5", alice, carol), AcceptKnownIP, nil},
		}},
		{"non-IP client text is a client keyed by its bytes", "0.0.0.0/0\n::/0\n", []step{
			{0, req("unknown", alice, bob), GreyNew, nil},
			{6 * time.Minute, req("unknown", alice, bob), AcceptRetried, nil},
			{0, req("unknown", alice, carol), AcceptKnownIP, nil},
			{0, req("Unknown", alice, carol), GreyNew, nil},
		}},
		{"different clients are different triplets", "", []step{
			{0, req(ip, alice, bob), GreyNew, nil},
			{6 * time.Minute, req("192.0.2.11", alice, bob), GreyNew, nil},
		}},
		{"trailing NULs: none, one, two", "", []step{
			{0, []byte("I" + ip + "\x00F" + alice + "\x00T" + bob), GreyNew, nil},
			{0, []byte("I" + ip + "\x00F" + alice + "\x00T" + bob + "\x00"), GreyTooSoon, nil},
			{0, []byte("I" + ip + "\x00F" + alice + "\x00T" + bob + "\x00\x00"), GreyTooSoon, nil},
		}},
		{"malformed: empty datagram", "", []step{{0, []byte{}, 0, errNoI}, {0, []byte{0, 0}, 0, errNoI}}},
		{"malformed: no I", "", []step{{0, []byte("X" + ip + "\x00F\x00"), 0, errNoI}}},
		{"malformed: I not at the start", "", []step{{0, []byte(" I" + ip + "\x00F\x00"), 0, errNoI}}},
		{"malformed: no F", "", []step{
			{0, []byte("I" + ip), 0, errNoF},
			{0, []byte("I" + ip + "\x00"), 0, errNoF},
			{0, []byte("I" + ip + "\x00T" + bob + "\x00"), 0, errNoF},
			{0, []byte("I" + ip + "\x00\x00F" + alice + "\x00"), 0, errNoF},
		}},
		{"malformed: F not at the start", "", []step{{0, []byte("I" + ip + "\x00xF" + alice + "\x00"), 0, errNoF}}},
		{"malformed: recipient without T", "", []step{
			{0, []byte("I" + ip + "\x00F" + alice + "\x00" + bob + "\x00"), 0, errNoT},
		}},
		{"malformed: empty field in the middle", "", []step{
			{0, []byte("I" + ip + "\x00F" + alice + "\x00\x00T" + bob + "\x00"), 0, errNoT},
		}},
		{"malformed after a recipient: the recipient stays recorded", "", []step{
			{0, []byte("I" + ip + "\x00F" + alice + "\x00T" + bob + "\x00X" + carol + "\x00"), 0, errNoT},
			{0, req(ip, alice, bob), GreyTooSoon, nil},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, clock := newTestGreylister(t, tt.whitelist)
			runSteps(t, g, clock, tt.steps)
		})
	}
}

// TestWhitelistRecordsNothing checks PROTOCOL.md §4 step 2: nothing else is
// examined or recorded for a whitelisted client.
func TestWhitelistRecordsNothing(t *testing.T) {
	g, _ := newTestGreylister(t, "192.0.2.0/24")
	var kb keyBuilder
	if v, err := g.decideQmail(&kb, req("192.0.2.99", alice, bob, carol)); err != nil || v != AcceptWhitelisted {
		t.Fatalf("got %04x, %v", v, err)
	}
	if known, grey := g.table.counts(); known != 0 || grey != 0 {
		t.Fatalf("table holds %d known, %d grey; want nothing", known, grey)
	}
}

// TestFractionalMinDelay checks that a 3-second minimum delay (-m 0.05)
// behaves as the Perl daemon's whole-second comparison does.
func TestFractionalMinDelay(t *testing.T) {
	c := defaultConfig()
	c.MinResendDelay.Duration = time.Duration(0.05 * float64(time.Minute))
	g, clock := newTestGreylister(t, "")
	set, err := resolve(c, Source{})
	if err != nil {
		t.Fatal(err)
	}
	g.SetRules(set.Policy, nil)
	if g.Policy().MinResendDelay != 3 {
		t.Fatalf("min delay = %d s, want 3", g.Policy().MinResendDelay)
	}
	runSteps(t, g, clock, []step{
		{0, req("192.0.2.1", alice, bob), GreyNew, nil},
		{2 * time.Second, req("192.0.2.1", alice, bob), GreyTooSoon, nil},
		{time.Second, req("192.0.2.1", alice, bob), AcceptRetried, nil},
	})
}

// TestStaleEntrySwept checks PROTOCOL.md §5: a grey entry past the window is
// answered 00 03 while held, and 00 01 once swept, which happens no sooner
// than a minute after it went stale.
func TestStaleEntrySwept(t *testing.T) {
	g, clock := newTestGreylister(t, "")
	var kb keyBuilder
	if v, _ := g.decideQmail(&kb, req("192.0.2.1", alice, bob)); v != GreyNew {
		t.Fatalf("got %04x", v)
	}
	sweepAll := func() {
		for i := range g.table.shards {
			g.table.sweepShard(i, g.clock(), g.Policy().expiry())
		}
	}
	clock.advance(12*time.Hour + 59*time.Second)
	sweepAll()
	if _, grey := g.table.counts(); grey != 1 {
		t.Fatalf("entry swept %d s after going stale; want it held for 60 s", 59)
	}
	clock.advance(time.Second)
	sweepAll()
	if _, grey := g.table.counts(); grey != 0 {
		t.Fatalf("entry still held 60 s after going stale")
	}
	if v, _ := g.decideQmail(&kb, req("192.0.2.1", alice, bob)); v != GreyNew {
		t.Fatalf("after the sweep got %04x, want new grey", v)
	}
}

func TestAppendReply(t *testing.T) {
	for v, want := range map[Verdict][]byte{
		AcceptWhitelisted: {1, 1}, AcceptKnownIP: {1, 2}, AcceptRetried: {1, 3}, AcceptBounce: {1, 4},
		GreyNew: {0, 1}, GreyTooSoon: {0, 2}, GreyStale: {0, 3},
	} {
		if got := appendReply(nil, v); !bytes.Equal(got, want) {
			t.Errorf("appendReply(%04x) = %x, want %x", v, got, want)
		}
		if v.Accepts() != (want[0] == 1) {
			t.Errorf("%04x.Accepts() = %v", v, v.Accepts())
		}
	}
}

// TestManyRecipients checks that every recipient of a large request is
// examined (the Perl daemon cut requests at 2048 bytes).
func TestManyRecipients(t *testing.T) {
	g, clock := newTestGreylister(t, "")
	rcpts := make([]string, 500)
	for i := range rcpts {
		rcpts[i] = fmt.Sprintf("user%03d-%s@rcpt.example", i, strings.Repeat("x", 90))
	}
	big := req("192.0.2.1", alice, rcpts...)
	if len(big) < 50000 || len(big) > maxRequestSize {
		t.Fatalf("request is %d bytes", len(big))
	}
	var kb keyBuilder
	if v, err := g.decideQmail(&kb, big); err != nil || v != GreyNew {
		t.Fatalf("got %04x, %v", v, err)
	}
	if _, grey := g.table.counts(); grey != 500 {
		t.Fatalf("recorded %d triplets, want 500", grey)
	}
	clock.advance(6 * time.Minute)
	// Only the last recipient retried: an earlier new one answers 00 01.
	if v, _ := g.decideQmail(&kb, req("192.0.2.2", alice, rcpts[499])); v != GreyNew {
		t.Fatalf("other client: got %04x", v)
	}
	if v, _ := g.decideQmail(&kb, big); v != AcceptRetried {
		t.Fatalf("retry of all 500: got %04x", v)
	}
}

// TestDecideAllocatesNothing proves that deciding a request allocates
// nothing once the key buffer has grown: for a known IP, a whitelisted IP,
// and a triplet lookup.
func TestDecideAllocatesNothing(t *testing.T) {
	g, clock := newTestGreylister(t, "10.0.0.0/8\n2001:db8::/32\n")
	var kb keyBuilder
	known := req("192.0.2.1", alice, bob)
	g.decideQmail(&kb, known)
	clock.advance(6 * time.Minute)
	g.decideQmail(&kb, known)
	grey := req("192.0.2.2", alice, bob, carol)
	g.decideQmail(&kb, grey)
	for name, d := range map[string][]byte{
		"known":       known,
		"whitelisted": req("10.1.2.3", alice, bob),
		"whitelist6":  req("2001:db8::1", alice, bob),
		"grey lookup": grey,
		"malformed":   []byte("I192.0.2.9\x00F\x00X"),
	} {
		if n := testing.AllocsPerRun(100, func() { g.decideQmail(&kb, d) }); n != 0 {
			t.Errorf("%s: %v allocations per request, want 0", name, n)
		}
	}
}

func FuzzDecideQmail(f *testing.F) {
	f.Add(req("192.0.2.10", alice, bob, carol))
	f.Add(req("2001:db8::1", "", verp))
	f.Add([]byte("I\x00F\x00T\x00"))
	f.Add([]byte("Iunknown\x00F\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, datagram []byte) {
		g, _ := newTestGreylister(t, "192.0.2.0/24")
		var kb keyBuilder
		v1, err1 := g.decideQmail(&kb, datagram)
		if err1 != nil {
			if !errors.Is(err1, errNoI) && !errors.Is(err1, errNoF) && !errors.Is(err1, errNoT) {
				t.Fatalf("unexpected error %v", err1)
			}
			return
		}
		if v1 != AcceptWhitelisted && v1 != AcceptKnownIP && v1 != AcceptRetried && v1 != AcceptBounce &&
			v1 != GreyNew && v1 != GreyTooSoon && v1 != GreyStale {
			t.Fatalf("verdict %04x is not in PROTOCOL.md §3", v1)
		}
		// Asking again at the same moment never turns a greylist into an
		// accept unless the client is known or whitelisted.
		v2, err2 := g.decideQmail(&kb, datagram)
		if err2 != nil {
			t.Fatalf("second decision failed: %v", err2)
		}
		if v1 == GreyNew && v2.Accepts() && v2 != AcceptKnownIP {
			t.Fatalf("new triplet answered %04x when asked again at once", v2)
		}
	})
}

// TestSweepRounds runs the sweeper with a short interval and checks that a
// round reports the expired entries it dropped.
func TestSweepRounds(t *testing.T) {
	g, clock := newTestGreylister(t, "")
	var kb keyBuilder
	for i := range 50 {
		g.decideQmail(&kb, req(fmt.Sprintf("192.0.2.%d", i), alice, bob))
	}
	clock.advance(13 * time.Hour)
	rounds := make(chan int, 100)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go g.sweep(ctx, 16*time.Millisecond, func(deleted int) { rounds <- deleted })
	select {
	case n := <-rounds:
		if n != 50 {
			t.Fatalf("first round dropped %d entries, want 50", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no sweep round within 10 s")
	}
	if _, grey := g.table.counts(); grey != 0 {
		t.Fatalf("%d grey entries left after a round", grey)
	}
}
