package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
	// sink, once set, is the daemon's queue in front of the buffer:
	// String waits for what it holds, so that a test reads every line
	// logged before it looked.
	sink atomic.Pointer[lossySink]
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	if sink := s.sink.Load(); sink != nil {
		sink.flush(logFlushTimeout)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// exchange sends datagram on conn and returns the reply, or nil if none
// comes within wait.
func exchange(t *testing.T, conn *net.UDPConn, datagram []byte, wait time.Duration) []byte {
	t.Helper()
	if _, err := conn.Write(datagram); err != nil {
		t.Fatalf("send: %v", err)
	}
	conn.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 16)
	n, err := conn.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		t.Fatalf("receive: %v", err)
	}
	return buf[:n]
}

func dial(t *testing.T, addr *net.UDPAddr) *net.UDPConn {
	t.Helper()
	conn, err := net.DialUDP("udp", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestRoundTrip checks the replies byte for byte through a real socket, that
// a malformed datagram gets no reply while the next good one is answered,
// the same for a 60000-byte request with 500 recipients, and the log lines.
func TestRoundTrip(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("198.51.100.0/24\n"), 0o644)
	cfg := defaultConfig()
	cfg.Whitelist = wl
	addr, stop := startDaemon(t, cfg, clock.now)
	conn := dial(t, addr)
	const wait = 5 * time.Second

	check := func(datagram []byte, want ...byte) {
		t.Helper()
		if got := exchange(t, conn, datagram, wait); !bytes.Equal(got, want) {
			t.Fatalf("request %q: reply %x, want %x", datagram, got, want)
		}
	}
	check(req("198.51.100.7", alice, bob), 1, 1)
	check(req("192.0.2.1", alice, bob), 0, 1)
	check(req("192.0.2.1", alice, bob), 0, 2)
	check(req("192.0.2.1", "", verp), 1, 4)
	check(req("192.0.2.1", alice), 1, 3)
	clock.advance(6 * time.Minute)
	check(req("192.0.2.1", alice, bob), 1, 3)
	check(req("192.0.2.1", alice, carol), 1, 2)
	check(req("192.0.2.2", alice, bob), 0, 1)
	clock.advance(13 * time.Hour)
	check(req("192.0.2.2", alice, bob), 0, 3)

	// A malformed datagram gets nothing; the next good one is answered.
	for _, bad := range [][]byte{[]byte("garbage"), []byte("I192.0.2.3\x00X\x00"), {}} {
		if got := exchange(t, conn, bad, 300*time.Millisecond); got != nil {
			t.Fatalf("malformed %q got reply %x", bad, got)
		}
		check(req("192.0.2.1", alice, "next@rcpt.example"), 1, 2)
	}

	// A 60000-byte request with 500 recipients, every one checked.
	rcpts := make([]string, 500)
	for i := range rcpts {
		rcpts[i] = fmt.Sprintf("r%03d%s@rcpt.example", i, strings.Repeat("x", 101))
	}
	big := req("192.0.2.50", alice, rcpts...)
	if len(big) < 60000 || len(big) > 65507 {
		t.Fatalf("big request is %d bytes", len(big))
	}
	check(big, 0, 1)
	check(req("192.0.2.50", alice, rcpts[499]), 0, 2) // the last recipient was recorded
	badBig := append(bytes.Clone(big[:len(big)-1]), "\x00Xnot-a-recipient\x00"...)
	if got := exchange(t, conn, badBig, 300*time.Millisecond); got != nil {
		t.Fatalf("malformed big request got reply %x", got)
	}
	check(req("192.0.2.1", alice, "last@rcpt.example"), 1, 2)

	stdout, _ := stop()
	local := conn.LocalAddr().(*net.UDPAddr)
	peer := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(local.Port))
	for _, want := range []string{
		peer.String() + " white I198.51.100.7 Falice@sender.example Tbob@rcpt.example \n",
		peer.String() + " new grey I192.0.2.1 ",
		peer.String() + " retry too soon I192.0.2.1 ",
		peer.String() + " bounce I192.0.2.1 F T" + verp + " \n",
		peer.String() + " retry ok I192.0.2.1 ",
		peer.String() + " ok ip I192.0.2.1 ",
		peer.String() + " stale grey I192.0.2.2 ",
		peer.String() + " bad req no I garbage\n",
		peer.String() + " bad req no F I192.0.2.3 X \n",
		peer.String() + " bad req no T I192.0.2.50 ",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// TestShutdownSavesState checks that SIGTERM's path (ctx done) writes a
// snapshot that the next run loads.
func TestShutdownSavesState(t *testing.T) {
	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.StateFile = filepath.Join(t.TempDir(), "greydaemon.state")
	addr, stop := startDaemon(t, cfg, clock.now)
	conn := dial(t, addr)
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("got %x", got)
	}
	stop()
	clock.advance(6 * time.Minute)
	addr, stop = startDaemon(t, cfg, clock.now)
	conn = dial(t, addr)
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 3}) {
		t.Fatalf("after restart got %x, want 0103: state was lost", got)
	}
	_, stderr := stop()
	if !strings.Contains(stderr, "loaded msgpack state file") {
		t.Errorf("stderr lacks the load report:\n%s", stderr)
	}
}

// TestConcurrentClients runs several clients at once (under -race in CI):
// every request is answered and every client's triplets are its own.
func TestConcurrentClients(t *testing.T) {
	clock := newFakeClock()
	addr, _ := startDaemon(t, defaultConfig(), clock.now)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for c := range 8 {
		wg.Go(func() {
			conn, err := net.DialUDP("udp", nil, addr)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			buf := make([]byte, 4)
			for i := range 50 {
				d := req(fmt.Sprintf("10.0.%d.%d", c, i), alice, bob)
				conn.Write(d)
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := conn.Read(buf)
				if err != nil || !bytes.Equal(buf[:n], []byte{0, 1}) {
					errs <- fmt.Errorf("client %d request %d: reply %x, err %v", c, i, buf[:n], err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestHandleAllocatesNothing proves that the server's per-datagram path,
// decision log line included, allocates nothing.
func TestHandleAllocatesNothing(t *testing.T) {
	g, clock := newTestGreylister(t, "10.0.0.0/8")
	srv := &server{g: g, dlog: newDecisionLog(io.Discard), log: newLogger(io.Discard, false)}
	allow, err := parseAllow([]string{"127.0.0.0/8", "::1/128"})
	if err != nil {
		t.Fatal(err)
	}
	srv.allow.Store(allow)
	w := srv.newWorker()
	peer := netip.MustParseAddrPort("127.0.0.1:4000")
	outsider := netip.MustParseAddrPort("192.0.2.200:4000")
	known := req("192.0.2.1", alice, bob)
	srv.handle(w, known, peer)
	clock.advance(6 * time.Minute)
	srv.handle(w, known, peer)
	grey := req("192.0.2.2", alice, bob)
	srv.handle(w, grey, peer)
	for name, d := range map[string][]byte{
		"known": known, "grey": grey, "white": req("10.0.0.1", alice, bob), "bad": []byte("junk"),
	} {
		if n := testing.AllocsPerRun(200, func() { srv.handle(w, d, peer) }); n != 0 {
			t.Errorf("%s: %v allocations per datagram, want 0", name, n)
		}
	}
	if n := testing.AllocsPerRun(200, func() { srv.handle(w, known, outsider) }); n != 0 {
		t.Errorf("refused: %v allocations per datagram, want 0", n)
	}
	if srv.handle(w, known, outsider) != nil {
		t.Error("a source outside the allow list got a reply")
	}
	var st FrontEndStats
	srv.UpdateStats(&st)
	if st.Refused != 202 || st.Verdicts[AcceptKnownIP.index()] < 200 {
		t.Errorf("refused %d, known-IP verdicts %d", st.Refused, st.Verdicts[AcceptKnownIP.index()])
	}
}

// TestBadRequestLogIsRateLimited checks that a flood of garbage logs only
// the 5 lines per second the README promises, and then says how many it
// left out.
func TestBadRequestLogIsRateLimited(t *testing.T) {
	g, clock := newTestGreylister(t, "")
	var out bytes.Buffer
	srv := &server{g: g, dlog: newDecisionLog(&out), log: newLogger(io.Discard, false)}
	w := srv.newWorker()
	peer := netip.MustParseAddrPort("127.0.0.1:4000")
	for range 1000 {
		if srv.handle(w, []byte("junk"), peer) != nil {
			t.Fatal("garbage got a reply")
		}
	}
	clock.advance(time.Second)
	srv.handle(w, []byte("junk"), peer)
	srv.dlog.flush()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 5+2 {
		t.Fatalf("got %d log lines, want %d:\n%s", len(lines), 5+2, out.String())
	}
	if want := "greydaemon: 995 bad requests not logged"; lines[5] != want {
		t.Errorf("got %q, want %q", lines[5], want)
	}
	var st FrontEndStats
	srv.UpdateStats(&st)
	if got := st.Malformed; got != 1001 {
		t.Errorf("malformed counter = %d, want 1001", got)
	}
}

// TestServePathAllocatesNothing proves that the whole path from socket read
// to reply write allocates nothing: it counts every allocation in the
// process while requests go through a running daemon and back.
func TestServePathAllocatesNothing(t *testing.T) {
	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.Allow = []string{"127.0.0.0/8"} // checked for every request
	cfg.MetricsListen = "127.0.0.1:0"   // counters kept for it
	addr, _ := startDaemon(t, cfg, clock.now)
	conn := dial(t, addr)
	known := req("192.0.2.1", alice, bob)
	grey := req("192.0.2.2", alice, bob)
	buf := make([]byte, 16)
	conn.SetReadDeadline(time.Now().Add(time.Minute))
	roundTrip := func(d []byte) {
		if _, err := conn.Write(d); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip(known)
	clock.advance(6 * time.Minute)
	roundTrip(known) // the IP is known now
	for range 100 {  // warm every reader's buffers
		roundTrip(grey)
	}
	for name, d := range map[string][]byte{"known IP": known, "grey": grey} {
		if n := testing.AllocsPerRun(500, func() { roundTrip(d) }); n != 0 {
			t.Errorf("%s: %v allocations per request through the socket, want 0", name, n)
		}
	}
}

// TestReusePortSockets checks that several SO_REUSEPORT sockets share one
// port and that a server on them answers clients spread over all of them.
func TestReusePortSockets(t *testing.T) {
	conns, err := listenUDP(&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, 3)
	if err != nil {
		t.Fatal(err)
	}
	port := conns[0].LocalAddr().(*net.UDPAddr).Port
	for _, c := range conns[1:] {
		if p := c.LocalAddr().(*net.UDPAddr).Port; p != port {
			t.Fatalf("socket on port %d, want %d", p, port)
		}
	}
	g, _ := newTestGreylister(t, "")
	srv := &server{g: g, conns: conns, log: newLogger(io.Discard, false)}
	served := make(chan struct{})
	go func() { srv.serve(1); close(served) }()
	addr := conns[0].LocalAddr().(*net.UDPAddr)
	for i := range 20 {
		conn := dial(t, addr)
		if got := exchange(t, conn, req(fmt.Sprintf("192.0.2.%d", i), alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
			t.Fatalf("client %d: reply %x", i, got)
		}
	}
	closeAll(conns)
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not return after the sockets closed")
	}
}

// TestReadLoopFallback checks the one-datagram-per-call reader that serves
// where batched I/O is not available.
func TestReadLoopFallback(t *testing.T) {
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	g, _ := newTestGreylister(t, "")
	srv := &server{g: g, conns: []*net.UDPConn{conn}, log: newLogger(io.Discard, false)}
	done := make(chan struct{})
	go func() { srv.readLoop(srv.newWorker(), conn); close(done) }()
	client := dial(t, conn.LocalAddr().(*net.UDPAddr))
	if got := exchange(t, client, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("reply %x, want 0001", got)
	}
	if got := exchange(t, client, []byte("junk"), 300*time.Millisecond); got != nil {
		t.Fatalf("junk got reply %x", got)
	}
	if got := exchange(t, client, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 2}) {
		t.Fatalf("reply %x, want 0002", got)
	}
	conn.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("readLoop did not return after the socket closed")
	}
	var st FrontEndStats
	srv.UpdateStats(&st)
	if st.Replies != 2 || st.Malformed != 1 {
		t.Fatalf("replies %d, malformed %d", st.Replies, st.Malformed)
	}
}
