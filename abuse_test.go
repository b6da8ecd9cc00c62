package main

import (
	"bytes"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// This file holds abuse tests: what an adversary (or a broken client) can
// send at the daemon, on 127.0.0.1 only, bounded in count and time.

// rssBytes returns the resident memory of this process.
func rssBytes(t *testing.T) int64 {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status: resident memory is measured on Linux only")
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS line")
	return 0
}

// TestMalformedFlood sends 100,000 malformed datagrams of every kind with a
// valid request after every ten: every valid one is answered, no malformed
// one is, and the log stays small.
func TestMalformedFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("sends 110,000 datagrams")
	}
	td := startTestDaemon(t, settingsOf(t, defaultConfig()), newFakeClock().now, nil)
	conn := dial(t, td.addr)
	garbage := [][]byte{
		[]byte("junk"), {}, {0}, []byte("F\x00I1.2.3.4\x00"), []byte("I1.2.3.4"), []byte("I1.2.3.4\x00Fa\x00X\x00"),
		req("192.0.2.1", alice, bob)[1:], bytes.Repeat([]byte{0xff}, 1400), []byte("I\x00\x00\x00T\x00"),
		append([]byte("I1.2.3.4\x00Fa@b\x00Tc@d\x00"), bytes.Repeat([]byte("\x1b[2J\r\n"), 200)...),
	}
	buf := make([]byte, 16)
	valid := 0
	for i := range 10_000 {
		for _, g := range garbage {
			conn.Write(g)
		}
		d := req("198.51.100.1", alice, "r"+strconv.Itoa(i)+"@x")
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		conn.Write(d)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("valid request %d after %d malformed: no reply: %v", i, i*len(garbage), err)
		}
		if !bytes.Equal(buf[:n], []byte{0, 1}) {
			t.Fatalf("valid request %d: reply %x (a malformed datagram was answered?)", i, buf[:n])
		}
		valid++
	}
	td.stop(t)
	var st Stats
	td.UpdateStats(&st)
	q := st.FrontEnds[0]
	// "I1.2.3.4\x00Fa@b\x00Tc@d\x00" followed by escape bytes is a valid
	// request whose last recipient lacks its T: malformed. All ten are.
	if q.Malformed != 100_000 || q.Replies != uint64(valid) {
		t.Errorf("malformed %d, replies %d; want 100000 and %d", q.Malformed, q.Replies, valid)
	}
	out := td.out.String()
	// One line per valid request, and at most 5 malformed lines a second
	// (the fake clock does not move: 5 in all) plus a count.
	if lines := strings.Count(out, "\n"); lines > valid+10 {
		t.Errorf("%d log lines for %d valid requests", lines, valid)
	}
	if len(out) > valid*120+10_000 {
		t.Errorf("log of %d bytes for %d valid requests", len(out), valid)
	}
}

// TestUniqueTripletFlood sends unique triplets past max_entries: the table
// stays under its cap, resident memory grows by no more than the cap
// implies, known IPs are kept, and evictions are counted.
func TestUniqueTripletFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("sends 600,000 datagrams")
	}
	const maxEntries = 200_000
	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.MaxEntries = maxEntries
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, func(d *daemon) { d.stdout = discard{} })
	conn := dial(t, td.addr)
	// Ten clients pass greylisting and become known.
	for i := range 10 {
		exchange(t, conn, req("203.0.113."+strconv.Itoa(i), alice, bob), 5*time.Second)
	}
	clock.advance(6 * time.Minute)
	for i := range 10 {
		if got := exchange(t, conn, req("203.0.113."+strconv.Itoa(i), alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 3}) {
			t.Fatalf("retry %d: %x", i, got)
		}
	}
	runtime.GC()
	before := rssBytes(t)

	// The flood: 600,000 unique triplets from many clients, 64 in flight.
	const n = 3 * maxEntries
	d := make([]byte, 0, 128)
	buf := make([]byte, 16)
	conn.SetReadDeadline(time.Now().Add(2 * time.Minute))
	inFlight := 0
	for i := range n {
		d = append(d[:0], "I10."...)
		d = strconv.AppendInt(d, int64(i>>16&255), 10)
		d = append(d, '.')
		d = strconv.AppendInt(d, int64(i>>8&255), 10)
		d = append(d, '.')
		d = strconv.AppendInt(d, int64(i&255), 10)
		d = append(d, "\x00Fspam@flood.example\x00Tvictim"...)
		d = strconv.AppendInt(d, int64(i), 10)
		d = append(d, "@rcpt.example\x00"...)
		conn.Write(d)
		if inFlight++; inFlight == 64 {
			for range inFlight {
				if _, err := conn.Read(buf); err != nil {
					t.Fatalf("flood stalled after %d: %v", i, err)
				}
			}
			inFlight = 0
		}
	}
	for range inFlight {
		conn.Read(buf)
	}
	runtime.GC()
	after := rssBytes(t)

	var st Stats
	td.UpdateStats(&st)
	if held := st.KnownIPs + st.GreyTriplets; held > maxEntries || held < maxEntries*9/10 {
		t.Errorf("holds %d entries after the flood, cap %d", held, maxEntries)
	}
	if st.KnownIPs != 10 {
		t.Errorf("%d of 10 known IPs kept", st.KnownIPs)
	}
	if st.Evictions < n-maxEntries {
		t.Errorf("%d evictions counted for %d triplets past a cap of %d", st.Evictions, n, maxEntries)
	}
	for i := range 10 {
		if got := exchange(t, conn, req("203.0.113."+strconv.Itoa(i), "x@y", "z@w"), 5*time.Second); !bytes.Equal(got, []byte{1, 2}) {
			t.Errorf("known client %d after the flood: %x", i, got)
		}
	}
	// Memory: the table's maps at about 50 bytes an entry, with room for
	// the maps' load factor and the GC's headroom: 150 bytes an entry (the
	// race detector's shadow memory doubles it).
	perEntry := int64(150)
	if raceDetector {
		perEntry = 300
	}
	grown := after - before
	t.Logf("resident memory grew %d kB for %d entries (%.0f bytes each); %d evictions",
		grown>>10, maxEntries, float64(grown)/maxEntries, st.Evictions)
	if grown > perEntry*maxEntries {
		t.Errorf("resident memory grew %d bytes, over the %d that a cap of %d entries allows", grown, perEntry*maxEntries, maxEntries)
	}
}

// TestOverloadRecovers drives the daemon far past what it can answer (8
// senders that never wait) for two seconds, then checks that it is still
// there, and once it has answered what the kernel queued, answers every
// one of 2,000 requests sent one at a time.
func TestOverloadRecovers(t *testing.T) {
	if testing.Short() {
		t.Skip("two seconds of overload")
	}
	td := startTestDaemon(t, settingsOf(t, defaultConfig()), time.Now, func(d *daemon) { d.stdout = discard{} })
	stop := make(chan struct{})
	var senders sync.WaitGroup
	for s := range 8 {
		conn := dial(t, td.addr)
		senders.Go(func() {
			d := make([]byte, 0, 128)
			for i := 0; i < 2_000_000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				d = append(d[:0], "I10.1."...)
				d = strconv.AppendInt(d, int64(s), 10)
				d = append(d, ".1\x00Fa@b\x00Tc"...)
				d = strconv.AppendInt(d, int64(i), 10)
				d = append(d, "@d\x00"...)
				conn.Write(d) // replies are never read: the socket's buffer overflows too
			}
		})
	}
	time.Sleep(2 * time.Second)
	close(stop)
	senders.Wait()

	// What the kernel queued during the overload is answered first; a new
	// client's request that finds the queue still full is dropped there,
	// as a real qmail-smtpd's would be. Probe until one is answered.
	conn := dial(t, td.addr)
	ended := time.Now()
	answered := false
	for range 30 {
		if exchange(t, conn, req("192.0.2.1", alice, "probe@x"), time.Second) != nil {
			answered = true
			break
		}
	}
	if !answered {
		t.Fatal("no answer within 30 s of the overload's end")
	}
	drained := time.Since(ended)
	start := time.Now()
	for i := range 2000 {
		if got := exchange(t, conn, req("192.0.2.1", alice, "after"+strconv.Itoa(i)+"@x"), 3*time.Second); len(got) != 2 {
			t.Fatalf("request %d after the overload: no reply within 3 s", i)
		}
	}
	var st Stats
	td.UpdateStats(&st)
	t.Logf("overload: %d requests read in 2 s; first answer %v after it ended; then 2000 answered one at a time in %v",
		st.FrontEnds[0].Requests, drained.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
}
