package main

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"
)

// TestNormalizeSender checks sender normalisation on the address shapes
// that big senders and lists use: the tag that changes from one message
// (or one retry) to the next goes, the rest stays.
func TestNormalizeSender(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		// Plain addresses are unchanged.
		{"alice@sender.example", "alice@sender.example"},
		{"Alice.Smith@Sender.Example", "Alice.Smith@Sender.Example"},
		{"no-at-sign", "no-at-sign"},
		{"", ""},
		// BATV, standard and early-draft forms, and Microsoft's.
		{"prvs=1234abcdef=alice@sender.example", "alice@sender.example"},
		{"PRVS=0123ABCDEF=bob@sender.example", "bob@sender.example"},
		{"prvs=alice=1234abcdef@sender.example", "alice@sender.example"},
		{"msprvs1=17653cTNqMgRz=bounces-1a2b@sender.example", "bounces-1a2b@sender.example"},
		{"prvs=notatag=alice@sender.example", "prvs=notatag=alice@sender.example"},
		// SRS: the original sender comes back.
		{"SRS0=HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"},
		{"srs0+aBcD=4Q=orig.example=alice@forwarder.example", "alice@orig.example"},
		{"SRS0=x7Yb=ZR=gmail.com=john.doe@fwd.example", "john.doe@gmail.com"},
		{"SRS1=HHH=fwd1.example==HHH=TT=orig.example=alice@fwd2.example", "alice@orig.example"},
		{"SRS0=broken@fwd.example", "SRS0=broken@fwd.example"},
		// VERP and per-message ids: digit runs and long hex ids collapse.
		{"bounces+12345-bob=rcpt.example@lists.example", "bounces+#-bob=rcpt.example@lists.example"},
		{"newsletter-bounce-8237462@news.example", "newsletter-bounce-#@news.example"},
		{"0100018c2f3a4b5c-1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d-000000@amazonses.com", "#-#-5e6f-4a7b-8c9d-#-#@amazonses.com"},
		{"msg-20240115.1@mail.example", "msg-#.1@mail.example"},
		{"user12@example.com", "user12@example.com"},
		{"deadbeefcafe@example.com", "deadbeefcafe@example.com"},
		// BATV and VERP together: a fresh tag and a fresh id, one key.
		{"prvs=2345bcdef0=bounce-987654@esp.example", "bounce-#@esp.example"},
	} {
		if got := string(normalizeSender(nil, []byte(tt.in))); got != tt.want {
			t.Errorf("normalizeSender(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() {
		buf := make([]byte, 0, 128)
		_ = normalizeSender(buf, []byte("prvs=1234abcdef=bounce-987654@esp.example"))
	}); n > 1 {
		t.Errorf("%v allocations", n)
	}
}

// TestAddrGrouping checks that addresses are keyed by their /24 or /64 when
// asked, and by themselves by default.
func TestAddrGrouping(t *testing.T) {
	for _, tt := range []struct {
		g        addrGrouping
		in, want string
	}{
		{addrGrouping{}, "192.0.2.77", "192.0.2.77"},
		{addrGrouping{v4Bits: 32, v6Bits: 128}, "2001:db8::1234", "2001:db8::1234"},
		{addrGrouping{v4Bits: 24, v6Bits: 64}, "192.0.2.77", "192.0.2.0"},
		{addrGrouping{v4Bits: 24, v6Bits: 64}, "2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"},
		{addrGrouping{v4Bits: 16, v6Bits: 48}, "198.51.100.9", "198.51.0.0"},
	} {
		if got := tt.g.group(netip.MustParseAddr(tt.in)); got.String() != tt.want {
			t.Errorf("%+v.group(%s) = %s, want %s", tt.g, tt.in, got, tt.want)
		}
	}
}

// TestGroupingAndNormalizationDecide runs the qmail decision with both on:
// a retry from another address of the same /24, with a fresh BATV tag and
// a fresh VERP number, passes; a retry from another /24 does not; and the
// whitelist still sees the exact address.
func TestGroupingAndNormalizationDecide(t *testing.T) {
	g, clock := newTestGreylister(t, "192.0.2.200/32")
	g.grouping, g.normalize = addrGrouping{v4Bits: 24, v6Bits: 64}, true
	var kb keyBuilder
	decide := func(d []byte) Verdict {
		t.Helper()
		v, err := g.decideQmail(&kb, d)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := decide(req("192.0.2.10", "prvs=1234abcdef=bounce-1001@esp.example", bob)); v != GreyNew {
		t.Fatalf("first attempt: %04x", v)
	}
	clock.advance(6 * time.Minute)
	if v := decide(req("198.51.100.10", "prvs=1234abcdef=bounce-1001@esp.example", bob)); v != GreyNew {
		t.Fatalf("retry from another /24: %04x, want new grey", v)
	}
	if v := decide(req("192.0.2.77", "prvs=2345bcdef0=bounce-2002@esp.example", bob)); v != AcceptRetried {
		t.Fatalf("retry from the same /24 with fresh tags: %04x, want 0103", v)
	}
	if v := decide(req("192.0.2.99", "x@y", "z@w")); v != AcceptKnownIP {
		t.Fatalf("the /24 is known now: %04x", v)
	}
	if v := decide(req("192.0.2.200", "x@y", "z@w")); v != AcceptWhitelisted {
		t.Fatalf("whitelisted address in a known /24: %04x, want 0101", v)
	}
}

// TestPrefixChangeRekeysKnownIPs saves known IPs keyed by the exact
// address and loads them with ipv4_prefix 24: they are keyed by their /24.
func TestPrefixChangeRekeysKnownIPs(t *testing.T) {
	clock := newFakeClock()
	path := filepath.Join(t.TempDir(), "state")
	old := newTestSnapshotter(t, path, clock)
	old.table.markKnown(clientKeyFromAddr(netip.MustParseAddr("192.0.2.10")), uint32(clock.now().Unix()), testExpiry)
	if _, err := old.save(); err != nil {
		t.Fatal(err)
	}
	grouping := addrGrouping{v4Bits: 24, v6Bits: 64}
	s := &snapshotter{path: path, table: newTable(16, 10_000), policy: testPolicyFunc, now: clock.now, grouping: grouping}
	if _, err := s.load(); err != nil {
		t.Fatal(err)
	}
	g := NewGreylister(s.table, testPolicy, nil, clock.now)
	g.grouping = grouping
	var kb keyBuilder
	if v, _ := g.decideQmail(&kb, req("192.0.2.55", alice, bob)); v != AcceptKnownIP {
		t.Fatalf("another address of the known IP's /24: %04x, want 0102", v)
	}
}
