package main

import (
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// This file holds tests for claims the docs make that no other test
// held: each one fails if the behaviour it names is removed or weakened.

// TestTimerSaveAndLogFlush runs the daemon in a child process with a save
// interval of about a second: it saves on its timer with no signal and no
// request asking, and a decision line reaches stdout while the daemon
// keeps running (it is written at once, not at exit).
func TestTimerSaveAndLogFlush(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	var out syncBuffer
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Stdout = &out
	c := startChildCmd(t, cmd, "-d", "-s", "0.017", "127.0.0.1:0", state)
	exchange(t, dial(t, c.addr), req("192.0.2.1", alice, bob), 5*time.Second)
	c.waitLog(t, ", timer)") // the debug line of a save the timer asked for
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("no state file after the timer's save: %v", err)
	}
	for range 500 {
		if strings.Contains(out.String(), "new grey I192.0.2.1 Falice@sender.example Tbob@rcpt.example") {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(out.String(), "new grey") {
		t.Fatalf("the decision line did not reach stdout within 5 s while the daemon ran: %q", out.String())
	}
	if err := stopChild(t, c); err != nil {
		t.Fatal(err)
	}
}

// TestSIGINTSaves checks that SIGINT, as Ctrl-C sends it, saves and exits 0
// through main's own signal handling.
func TestSIGINTSaves(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	c := startChild(t, "127.0.0.1:0", state)
	exchange(t, dial(t, c.addr), req("192.0.2.1", alice, bob), 5*time.Second)
	c.cmd.Process.Signal(syscall.SIGINT)
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGINT: %v\n%s", err, c.log.String())
	}
	if n := greyInState(t, state); n != 1 {
		t.Fatalf("%d grey triplets saved after SIGINT, want 1", n)
	}
}

// TestSetAsideNeverOverwrites damages the state file twice in the same
// second: the second copy gets its own name and the first is untouched.
func TestSetAsideNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	now := time.Unix(1_700_000_000, 0)
	os.WriteFile(path, []byte("first damaged"), 0o600)
	a, err := setAside(path, now)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, []byte("second damaged"), 0o600)
	b, err := setAside(path, now)
	if err != nil {
		t.Fatal(err)
	}
	if a == b || string(mustRead(t, a)) != "first damaged" || string(mustRead(t, b)) != "second damaged" {
		t.Fatalf("set aside as %s and %s: %q, %q", a, b, mustRead(t, a), mustRead(t, b))
	}
	if _, err := os.Stat(path); err == nil {
		t.Error("the damaged file is still in place")
	}
}

// TestLoadRespectsCap loads a snapshot holding more entries than the
// table's cap: the table holds no more than its cap, and the evictions are
// counted.
func TestLoadRespectsCap(t *testing.T) {
	clock := newFakeClock()
	path := filepath.Join(t.TempDir(), "state")
	big := newTestSnapshotter(t, path, clock)
	now := uint32(clock.now().Unix())
	for i := range uint64(20_000) {
		big.table.observeTriplet(tkey(i), now-uint32(i%100), 300, 43200, testExpiry)
	}
	if _, err := big.save(); err != nil {
		t.Fatal(err)
	}
	small := &snapshotter{path: path, table: newTable(shardsFor(5000), 5000), policy: testPolicyFunc, now: clock.now}
	if _, err := small.load(); err != nil {
		t.Fatal(err)
	}
	known, grey := small.table.counts()
	if known+grey > 5000 || known+grey < 5000*(evictFraction-1)/evictFraction-100 {
		t.Fatalf("loaded %d entries into a table capped at 5000", known+grey)
	}
	if ev := small.table.evicted.Load(); ev != uint64(20_000-known-grey) {
		t.Errorf("%d evictions counted for %d entries left out", ev, 20_000-known-grey)
	}
}

// TestEvictionFreesASixteenth fills one shard and inserts one more entry:
// the eviction frees a sixteenth of the shard at once (the oldest), so the
// scan is shared by that many inserts.
func TestEvictionFreesASixteenth(t *testing.T) {
	tb := newTable(1, 1600)
	for i := range uint64(1600) {
		tb.observeTriplet(tkey(i), 1_000_000+uint32(i), 300, 43200, testExpiry)
	}
	if tb.evicted.Load() != 0 {
		t.Fatalf("evicted %d before the shard was full", tb.evicted.Load())
	}
	tb.observeTriplet(tkey(1600), 1_002_000, 300, 43200, testExpiry)
	if ev := tb.evicted.Load(); ev != 1600/evictFraction || evictFraction != 16 {
		t.Fatalf("one insert into a full shard evicted %d, want %d", ev, 1600/16)
	}
	_, grey := tableContents(tb)
	for i := range uint64(100) {
		if _, ok := grey[tkey(i)]; ok {
			t.Fatalf("entry %d, among the oldest, survived the eviction", i)
		}
	}
}

// TestWhitelistMaskDropsEveryHostBit masks ranges whose host bits are all
// set, for every prefix length: the masked range keeps no host bit, and
// contains its own first and last address but nothing past them.
func TestWhitelistMaskDropsEveryHostBit(t *testing.T) {
	for _, all := range []string{"255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"} {
		addr := netip.MustParseAddr(all)
		for bits := 1; bits < addr.BitLen(); bits++ {
			text := all + "/" + itoa(bits)
			w, err := parseWhitelist(strings.NewReader(text), "wl", func(string) {})
			if err != nil {
				t.Fatal(err)
			}
			want := netip.PrefixFrom(addr, bits).Masked()
			if _, ok := w.ranges[want]; !ok || w.Len() != 1 {
				t.Fatalf("%s: ranges %v, want %v", text, w.ranges, want)
			}
			// The address just below the range is outside it.
			below := want.Addr().Prev()
			if w.Contains(below) || !w.Contains(want.Addr()) || !w.Contains(addr) {
				t.Fatalf("%s: wrong membership at the range's edges", text)
			}
		}
	}
}

// TestServingAllocatesNothingOnAnySocket counts the process's heap
// allocations (runtime.MemStats.Mallocs, not testing.AllocsPerRun, which
// rounds down) over thousands of requests spread by the kernel over every
// SO_REUSEPORT socket, with metrics and the allow list on: there must be
// none.
func TestServingAllocatesNothingOnAnySocket(t *testing.T) {
	t.Setenv("GREYDAEMON_SOCKETS", "4")
	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.Allow = []string{"127.0.0.0/8"}
	cfg.MetricsListen = "127.0.0.1:0"
	// Decision lines go to a writer that keeps nothing, as to a pipe: a
	// buffer that grows would count its own allocations.
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, func(d *daemon) { d.stdout = discard{} })
	if n := len(td.qmail.conns); n != 4 {
		t.Fatalf("%d sockets, want 4", n)
	}
	// 32 clients, so that the kernel's hash spreads them over the sockets.
	var conns []*net.UDPConn
	for range 32 {
		conns = append(conns, dial(t, td.addr))
	}
	known := req("192.0.2.1", alice, bob)
	buf := make([]byte, 16)
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(time.Minute)) // once: setting it may allocate
	}
	roundTrip := func(conn *net.UDPConn, d []byte) {
		if _, err := conn.Write(d); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip(conns[0], known)
	clock.advance(6 * time.Minute)
	grey := req("192.0.2.2", alice, bob)
	for range 20 { // warm every reader
		for _, c := range conns {
			roundTrip(c, known)
			roundTrip(c, grey)
		}
	}
	// No runtime.GC() here: a collection empties the runtime's cache of
	// wait-queue entries, which it then fills again.
	const rounds = 250
	requireNoAllocations(t, rounds*len(conns)*2, func() {
		for range rounds {
			for _, c := range conns {
				roundTrip(c, known)
				roundTrip(c, grey)
			}
		}
	})
	var st Stats
	td.UpdateStats(&st)
	busy := 0
	for _, w := range td.qmail.workers {
		if w.counts.requests.Load() > 0 {
			busy++
		}
	}
	if busy < 4 {
		t.Errorf("only %d readers served requests; the sockets did not all take part", busy)
	}
}
