package main

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file holds the regression tests for faults found by trying to break
// the daemon (see the Reliability section of the README).

// stopChild sends SIGTERM to a child daemon and returns its exit error.
func stopChild(t *testing.T, c *childDaemon) error {
	t.Helper()
	c.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- c.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("the child did not stop within 30 s")
	}
	return nil
}

// TestClosedStdout runs the daemon with stdout on a pipe nobody reads
// (`greydaemon ... | true`): it keeps answering, says so on stderr, counts
// the lost lines, and saves at exit.
func TestClosedStdout(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	state := filepath.Join(t.TempDir(), "state")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Stdout = w
	c := startChildCmd(t, cmd, "-s", "0.02", "127.0.0.1:0", state) // a save every 1.2 s flushes nothing to stdout
	w.Close()
	conn := dial(t, c.addr)
	for i := range 3 {
		if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); len(got) != 2 {
			t.Fatalf("query %d: reply %x", i, got)
		}
	}
	c.waitLog(t, "cannot write the decision log to stdout")
	if got := exchange(t, conn, req("192.0.2.2", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("after the log failed: reply %x", got)
	}
	if err := stopChild(t, c); err != nil {
		t.Fatalf("exit: %v\n%s", err, c.log.String())
	}
	if !strings.Contains(c.log.String(), "log lines lost: 4 on stdout") {
		t.Errorf("the stop line does not count the lost lines:\n%s", c.log.String())
	}
	var dump bytes.Buffer
	if err := dumpFile(state, &dump); err != nil || strings.Count(dump.String(), "G ") != 2 {
		t.Fatalf("state at exit: %v\n%s", err, dump.String())
	}
}

// TestClosedStderr runs the daemon with stderr on a pipe nobody reads: it
// starts (its first message no longer kills it), says so on stdout,
// answers, and saves at exit. Its address comes from a socket passed as
// systemd would, since its "listening on" line is lost.
func TestClosedStderr(t *testing.T) {
	sock, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	f, _ := sock.File()
	addr := sock.LocalAddr().(*net.UDPAddr)
	sock.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	state := filepath.Join(t.TempDir(), "state")
	var out syncBuffer
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -test.run='^$'`, os.Args[0])
	cmd.ExtraFiles = []*os.File{f}
	cmd.Env = append(os.Environ(), childDaemonEnv+"=127.0.0.1:0\n"+state)
	cmd.Stdout, cmd.Stderr = &out, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	w.Close()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	conn := dial(t, addr)
	var got []byte
	for range 100 { // it answers once it has loaded its state
		if got = exchange(t, conn, req("192.0.2.1", alice, bob), 100*time.Millisecond); got != nil {
			break
		}
	}
	if !bytes.Equal(got, []byte{0, 1}) && !bytes.Equal(got, []byte{0, 2}) {
		t.Fatalf("reply %x, want a greylisting answer", got)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "greydaemon: error: cannot write to stderr") {
		t.Errorf("no word on stdout:\n%s", out.String())
	}
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("no state saved: %v", err)
	}
}

// TestLogLineBoundedAndEscaped checks that an ordinary request is logged as
// the Perl daemon logs it, that control bytes cannot start a line or drive
// a terminal, and that a huge request makes a bounded line that says how
// much was cut.
func TestLogLineBoundedAndEscaped(t *testing.T) {
	peer := netip.MustParseAddrPort("192.0.2.7:4567")
	for _, tt := range []struct{ request, want string }{
		{string(req("192.0.2.1", alice, bob)), "192.0.2.7:4567 new grey I192.0.2.1 F" + alice + " T" + bob + " \n"},
		{"I1.2.3.4\x00Fa@b\r\n192.0.2.9:1 retry ok fake\x00T\x1b[2Jx\x00",
			`192.0.2.7:4567 new grey I1.2.3.4 Fa@b\x0d\x0a192.0.2.9:1 retry ok fake T\x1b[2Jx ` + "\n"},
		{"I1.2.3.4\x00Fj\xc3\xbcrgen@b\xff\xc2\x9b\x7f\x00", `192.0.2.7:4567 new grey I1.2.3.4 Fjürgen@b\xff\xc2\x9b\x7f ` + "\n"},
	} {
		if got := string(appendLogLine(nil, peer, "new grey", []byte(tt.request))); got != tt.want {
			t.Errorf("got  %q\nwant %q", got, tt.want)
		}
	}
	huge := req("192.0.2.1", alice, strings.Repeat("r", 60_000))
	line := appendLogLine(nil, peer, "new grey", huge)
	if len(line) > maxLoggedRequest+100 || bytes.Count(line, []byte{'\n'}) != 1 {
		t.Fatalf("a %d-byte request made a %d-byte line", len(huge), len(line))
	}
	if want := " ...[" + itoa(len(huge)-maxLoggedRequest) + " more bytes]\n"; !bytes.HasSuffix(line, []byte(want)) {
		t.Errorf("line ends %q, want %q", line[len(line)-40:], want)
	}
}

// TestShutdownAnswersWhatItRead stops a daemon in the middle of a flood:
// every request it read was answered (before, requests read at shutdown
// were recorded but their replies failed on the closed socket).
func TestShutdownAnswersWhatItRead(t *testing.T) {
	td := startTestDaemon(t, settingsOf(t, defaultConfig()), newFakeClock().now, nil)
	var clients sync.WaitGroup
	stop := make(chan struct{})
	for c := range 4 {
		conn := dial(t, td.addr)
		clients.Go(func() {
			go func() { // drain replies
				buf := make([]byte, 16)
				for {
					if _, err := conn.Read(buf); err != nil {
						return
					}
				}
			}()
			for i := range 200_000 {
				select {
				case <-stop:
					return
				default:
				}
				conn.Write(req(fmt.Sprintf("192.0.2.%d", c), alice, fmt.Sprintf("r%d@x", i)))
			}
		})
	}
	time.Sleep(300 * time.Millisecond) // let the flood build up
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	close(stop)
	clients.Wait()
	var st Stats
	td.UpdateStats(&st)
	q := st.FrontEnds[0]
	if q.Requests == 0 || q.Replies != q.Requests || q.WriteErrors != 0 || q.Malformed != 0 {
		t.Fatalf("%d requests read, %d answered, %d replies failed, %d malformed", q.Requests, q.Replies, q.WriteErrors, q.Malformed)
	}
	t.Logf("%d requests read during the flood, all answered", q.Requests)
}
