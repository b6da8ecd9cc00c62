package main

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// This file pins the documented defaults and limits by their literal
// values, and drives settings through the config file a user writes.

// TestDocumentedDefaults loads an empty config file the way the daemon
// does and checks every default against the value the docs give.
func TestDocumentedDefaults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "empty.toml")
	os.WriteFile(path, nil, 0o644)
	set, err := parseCommandLine([]string{"-c", path})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		key       string
		got, want any
	}{
		{"listen", set.Listen, "127.0.0.1:1999"},
		{"state_file", set.StateFile, "greydaemon.state"},
		{"save_interval", set.SaveInterval.Duration, 10 * time.Minute},
		{"known_ip_lifetime", set.Policy.KnownIPLifetime, uint32(7 * 86400)},
		{"resend_window", set.Policy.ResendWindow, uint32(12 * 3600)},
		{"min_resend_delay", set.Policy.MinResendDelay, uint32(300)},
		{"max_entries", set.MaxEntries, 2_000_000},
		{"ipv4_prefix", set.IPv4Prefix, 32},
		{"ipv6_prefix", set.IPv6Prefix, 128},
		{"normalize_sender", set.NormalizeSender, false},
		{"policy_socket_mode", set.PolicyMode, os.FileMode(0o660)},
		{"policy_defer_text", set.PolicyDeferText, "Greylisted, please try again in %s seconds"},
		{"policy_prepend_header", set.PolicyPrependHeader, true},
		{"policy_max_connections", set.PolicyMaxConnections, 256},
		{"policy_idle_timeout", set.PolicyIdleTimeout.Duration, 10 * time.Minute},
		{"milter_listen", set.MilterListen, ""},
		{"milter_socket_mode", set.MilterMode, os.FileMode(0o660)},
		{"milter_socket_group", set.MilterGroup, ""},
		{"milter_max_connections", set.MilterMaxConnections, 256},
		{"milter_idle_timeout", set.MilterIdleTimeout.Duration, time.Hour},
		{"milter_add_header", set.MilterAddHeader, true},
		{"milter_delayed_reject", set.MilterDelayedReject, false},
		{"greylistd_socket_mode", set.ListMode, os.FileMode(0o660)},
		{"greylistd_retry_min", set.Policy.ListRetryMin, uint32(600)},
		{"greylistd_retry_max", set.Policy.ListRetryMax, uint32(8 * 3600)},
		{"greylistd_expire", set.Policy.ListExpire, uint32(60 * 86400)},
		{"redis_prefix", set.RedisPrefix, "greydaemon:"},
		{"redis_timeout", set.RedisTimeout.Duration, 250 * time.Millisecond},
		{"redis_fallback", set.RedisFallback, "local"},
		{"allow", set.Allow == nil, true},
		{"debug", set.Debug, false},
	} {
		if c.got != c.want {
			t.Errorf("default %s = %v, want %v", c.key, c.got, c.want)
		}
	}
	// Limits that are not settings.
	for _, c := range []struct {
		what      string
		got, want int
	}{
		{"greylistd socket connections", listMaxConnections, 1024},
		{"metrics connections", metricsMaxConnections, 16},
		{"bytes of a request in a log line", maxLoggedRequest, 1024},
		{"malformed-request lines a second", badPerSecond, 5},
		{"bytes of log lines queued for a stuck reader", lossyQueueLimit, 1 << 20},
		{"bytes of a milter packet", milterMaxPacket, 64 << 10},
		{"null-sender recipients held for DATA", milterMaxHeld, 1000},
		{"bytes of the null-sender recipients held for DATA", milterMaxHeldBytes, 64 << 10},
	} {
		if c.got != c.want {
			t.Errorf("%s: %d, want %d", c.what, c.got, c.want)
		}
	}
	for _, c := range []struct {
		what      string
		got, want time.Duration
	}{
		{"shutdown grace of a stream connection", stopGrace, 2 * time.Second},
		{"milter reply write deadline", milterWriteTimeout, 10 * time.Second},
		{"log flush at exit", logFlushTimeout, 2 * time.Second},
		{"Redis close at exit", redisCloseTimeout, 2 * time.Second},
		{"floor between requested saves", saveRequestFloor, 5 * time.Second},
		{"greylistd request timeout", listTimeout, 10 * time.Second},
	} {
		if c.got != c.want {
			t.Errorf("%s: %v, want %v", c.what, c.got, c.want)
		}
	}
}

// TestDurationsRoundUpAndLongOnes checks that durations become whole
// seconds rounded up (a limit is never shortened), that 100 years (36,500
// days) is the longest a duration may be, and that "40000d" is refused
// naming the file and line.
func TestDurationsRoundUpAndLongOnes(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.toml")
	os.WriteFile(path, []byte("min_resend_delay = \"2001ms\"\nresend_window = \"1.5d\"\nknown_ip_lifetime = \"36500d\"\n"), 0o644)
	set, err := parseCommandLine([]string{"-c", path})
	if err != nil {
		t.Fatal(err)
	}
	if p := set.Policy; p.MinResendDelay != 3 || p.ResendWindow != 129600 || p.KnownIPLifetime != 36500*86400 {
		t.Errorf("min delay %d s, window %d s, known-IP lifetime %d s; want 3, 129600, 3153600000", p.MinResendDelay, p.ResendWindow, p.KnownIPLifetime)
	}
	long := filepath.Join(dir, "long.toml")
	os.WriteFile(long, []byte("\nknown_ip_lifetime = \"40000d\"\n"), 0o644)
	if _, err := parseCommandLine([]string{"-c", long}); err == nil || !strings.Contains(err.Error(), long+":2: known_ip_lifetime: duration \"40000d\" is too long") {
		t.Errorf("40000d: %v", err)
	}
}

// TestLogCutAt1024 checks the cut of a long request in a log line by its
// literal numbers: 1,024 bytes shown, then how many more.
func TestLogCutAt1024(t *testing.T) {
	line := appendLogLine(nil, netip.MustParseAddrPort("192.0.2.1:25"), "new grey", bytes.Repeat([]byte("a"), 3000))
	want := "192.0.2.1:25 new grey " + strings.Repeat("a", 1024) + " ...[1976 more bytes]\n"
	if string(line) != want {
		t.Errorf("log line of a 3,000-byte request is %d bytes, want %d", len(line), len(want))
	}
}

// TestKeySettingsFromConfig runs daemons from config files that set
// ipv4_prefix, ipv6_prefix and normalize_sender: each reaches the
// decisions (a retry from another address of the /24 or /64 passes; a
// BATV-tagged sender's retry with a new tag passes), and the defaults do
// not group.
func TestKeySettingsFromConfig(t *testing.T) {
	for _, tt := range []struct {
		name        string
		lines       []string
		first, then []byte
		want        []byte
	}{
		{"ipv4_prefix 24", []string{"ipv4_prefix = 24"}, req("192.0.2.1", alice, bob), req("192.0.2.77", alice, bob), []byte{1, 3}},
		{"ipv4 default", nil, req("192.0.2.1", alice, bob), req("192.0.2.77", alice, bob), []byte{0, 1}},
		{"ipv6_prefix 48", []string{"ipv6_prefix = 48"}, req("2001:db8::1", alice, bob), req("2001:db8:0:1::2", alice, bob), []byte{1, 3}},
		{"ipv6 default 128", nil, req("2001:db8::1", alice, bob), req("2001:db8::2", alice, bob), []byte{0, 1}},
		{"normalize_sender", []string{"normalize_sender = true"}, req("192.0.2.1", "prvs=1234abcdef=alice@sender.example", bob),
			req("192.0.2.1", "prvs=9999abcdef=alice@sender.example", bob), []byte{1, 3}},
		{"sender as given", nil, req("192.0.2.1", "prvs=1234abcdef=alice@sender.example", bob),
			req("192.0.2.1", "prvs=9999abcdef=alice@sender.example", bob), []byte{0, 1}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conf := writeConfig(t, t.TempDir(), tt.lines...)
			clock := newFakeClock()
			td := startTestDaemon(t, fromArgs("-c", conf), clock.now, nil)
			conn := dial(t, td.addr)
			if got := exchange(t, conn, tt.first, 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
				t.Fatalf("first attempt: %x", got)
			}
			clock.advance(6 * time.Minute)
			if got := exchange(t, conn, tt.then, 5*time.Second); !bytes.Equal(got, tt.want) {
				t.Errorf("retry: %x, want %x", got, tt.want)
			}
		})
	}
}

// TestPerlIPv6TripletsMatch checks the promise to qmail sites moving from
// the Perl daemon: an IPv6 grey triplet in a Perl save file is found by
// lookup under the defaults (each address by itself).
func TestPerlIPv6TripletsMatch(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	path := filepath.Join(t.TempDir(), "greydata")
	os.WriteFile(path, []byte(fmt.Sprintf("G %d 2001:db8::5 alice@sender.example bob@rcpt.example\n", now.Unix()-120)), 0o644)
	var out bytes.Buffer
	if err := lookupCommand([]string{path, "2001:db8::5", "alice@sender.example", "bob@rcpt.example"}, &out, func() time.Time { return now }); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "first seen") || strings.Contains(out.String(), "not seen") {
		t.Errorf("lookup of an IPv6 triplet of the Perl file:\n%s", out.String())
	}
}
