package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
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

// A testDaemon is a daemon that a test started with startTestDaemon.
type testDaemon struct {
	*daemon
	addr    *net.UDPAddr        // the qmail front end's address
	addrs   map[string]net.Addr // every front end's address by name
	signals chan os.Signal      // what the daemon takes as signals
	out     *syncBuffer         // its stdout: decision lines
	errOut  *syncBuffer         // its stderr
	done    chan error
	stopped bool
	err     error
	// stopDaemon cancels the daemon's context.
	stopDaemon func()
}

// startTestDaemon runs a daemon that reads its settings with load, with the
// clock now; configure, if not nil, may set hooks before it starts. The
// daemon stops when the test ends, if the test has not stopped it. It is
// the one way tests and benchmarks start a daemon in this process.
func startTestDaemon(t testing.TB, load func() (*Settings, error), now func() time.Time, configure func(*daemon)) *testDaemon {
	t.Helper()
	td := &testDaemon{signals: make(chan os.Signal, 4), out: &syncBuffer{}, errOut: &syncBuffer{}, done: make(chan error, 1)}
	td.daemon = newDaemon(load, td.out, td.errOut)
	td.now = now
	td.daemon.signals = td.signals
	ready := make(chan map[string]net.Addr, 1)
	td.onReady = func(a map[string]net.Addr) { ready <- a }
	if configure != nil {
		configure(td.daemon)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { td.done <- td.daemon.run(ctx) }()
	select {
	case td.addrs = <-ready:
		td.addr = td.addrs["qmail"].(*net.UDPAddr)
		td.out.sink.Store(td.daemon.outSink)
		td.errOut.sink.Store(td.daemon.errSink)
	case err := <-td.done:
		cancel()
		t.Fatalf("daemon did not start: %v\n%s", err, td.errOut.String())
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("daemon did not start within 30 s")
	}
	td.stopDaemon = cancel
	t.Cleanup(func() { td.stop(t) })
	return td
}

// stop stops the daemon, once, and returns what run returned.
func (td *testDaemon) stop(t testing.TB) error {
	t.Helper()
	if !td.stopped {
		td.stopped = true
		td.stopDaemon()
		select {
		case td.err = <-td.done:
		case <-time.After(30 * time.Second):
			t.Fatal("daemon did not stop within 30 s")
		}
	}
	return td.err
}

// settingsOf returns a load function for cfg, on 127.0.0.1:0 and, unless
// cfg names one, a state file in a temporary directory.
func settingsOf(t testing.TB, cfg Config) func() (*Settings, error) {
	t.Helper()
	cfg.Listen = "127.0.0.1:0"
	if cfg.StateFile == defaultStateFile {
		cfg.StateFile = filepath.Join(t.TempDir(), "state")
	}
	return func() (*Settings, error) { return resolve(cfg, Source{}) }
}

// startDaemon runs a daemon with cfg's settings (see settingsOf) and
// returns its qmail address and a function that stops it and returns its
// stdout and stderr. The daemon must stop cleanly.
func startDaemon(t *testing.T, cfg Config, now func() time.Time) (addr *net.UDPAddr, stop func() (stdout, stderr string)) {
	t.Helper()
	td := startTestDaemon(t, settingsOf(t, cfg), now, nil)
	return td.addr, func() (string, string) {
		if err := td.stop(t); err != nil {
			t.Errorf("daemon returned %v", err)
		}
		return td.out.String(), td.errOut.String()
	}
}

// testPolicyFunc returns testPolicy, for a snapshotter.
func testPolicyFunc() Policy { return testPolicy }

// itoa formats n in decimal.
func itoa(n int) string { return strconv.Itoa(n) }

// greyInState returns how many grey triplets the state file at path holds,
// failing the test if it cannot be read.
func greyInState(t *testing.T, path string) int {
	t.Helper()
	var dump bytes.Buffer
	if err := dumpFile(path, &dump); err != nil {
		t.Fatalf("state file: %v", err)
	}
	n := 0
	for _, line := range strings.Split(dump.String(), "\n") {
		if strings.HasPrefix(line, "G ") {
			n++
		}
	}
	return n
}

// passedSocket binds a UDP socket on 127.0.0.1 and returns it as a file to
// pass to a child, with its address; the caller closes the file once the
// child has it.
func passedSocket(t *testing.T) (*os.File, *net.UDPAddr) {
	t.Helper()
	sock, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	f, err := sock.File()
	if err != nil {
		t.Fatal(err)
	}
	return f, sock.LocalAddr().(*net.UDPAddr)
}

// activatedChildCmd returns a command that runs the test binary as a child
// daemon with f as a socket passed the way systemd passes one (descriptor
// 3, LISTEN_FDS=1, LISTEN_PID the child's own pid, which sh sets before
// exec keeps it).
func activatedChildCmd(f *os.File) *exec.Cmd {
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -test.run='^$'`, os.Args[0])
	cmd.ExtraFiles = []*os.File{f}
	return cmd
}

// requireNoAllocations runs work, which sends many requests, in up to
// three windows and counts the process's heap allocations in each
// (runtime.MemStats.Mallocs, which does not round down as
// testing.AllocsPerRun does). A window without any passes. An allocation
// per request, or one per thousand, shows in every window; what the Go
// runtime allocates for itself once in a while (a new thread, a wait-queue
// entry, the race detector's bookkeeping) does not.
func requireNoAllocations(t *testing.T, requests int, work func()) {
	t.Helper()
	fewest := ^uint64(0)
	for range 3 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		work()
		runtime.ReadMemStats(&after)
		n := after.Mallocs - before.Mallocs
		if n == 0 {
			return
		}
		fewest = min(fewest, n)
	}
	t.Errorf("at least %d heap allocations in the process over %d requests, in each of 3 tries; want 0", fewest, requests)
}
