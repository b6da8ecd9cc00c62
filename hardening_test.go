package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file holds the regression tests for faults found by trying to break
// the daemon (see the Reliability section of docs/design.md).

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
	if n := greyInState(t, state); n != 2 {
		t.Fatalf("%d grey triplets saved at exit, want 2", n)
	}
}

// TestClosedStderr runs the daemon with stderr on a pipe nobody reads: it
// starts (its first message no longer kills it), says so on stdout,
// answers, and saves at exit. Its address comes from a socket passed as
// systemd would, since its "listening on" line is lost.
func TestClosedStderr(t *testing.T) {
	f, addr := passedSocket(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	state := filepath.Join(t.TempDir(), "state")
	var out syncBuffer
	cmd := activatedChildCmd(f)
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
// were recorded but their replies failed on the closed socket), and is in
// the final save, which comes after the front ends stop.
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
	// Every request answered is in the final save, which runs after the
	// front ends have stopped: each was a new triplet.
	if grey := greyInState(t, td.set.StateFile); uint64(grey) != q.Requests {
		t.Fatalf("the final save holds %d grey triplets; %d requests were answered", grey, q.Requests)
	}
	t.Logf("%d requests read during the flood, all answered and saved", q.Requests)
}

// nobodyDir returns a fresh directory that user nobody can enter and, if
// owned, write, with its uid and gid; it skips the test unless it runs as
// root, which switching users needs (CI runs as root).
func nobodyDir(t *testing.T, owned bool) (dir string, uid, gid int) {
	t.Helper()
	requireRoot(t, "to start the daemon with -u nobody")
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Fatalf("no user nobody: %v", err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	dir, err = os.MkdirTemp("", "greydaemon-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	if owned {
		os.Chown(dir, uid, gid)
	}
	return dir, uid, gid
}

// TestPerlSaveFileOwnedByRoot migrates a Perl save file that belongs to
// root, with the daemon running as nobody in a directory nobody owns: the
// kernel's protected_hardlinks refuses a link to root's file, so the
// original is kept as a copy, and saving works from the first save on.
func TestPerlSaveFileOwnedByRoot(t *testing.T) {
	dir, _, _ := nobodyDir(t, true)
	state := filepath.Join(dir, "greydata")
	now := time.Now().Unix()
	perl := fmt.Sprintf("I %d 192.0.2.1\nG %d 192.0.2.2 alice@sender.example bob@rcpt.example\n", now-60, now-60)
	if err := os.WriteFile(state, []byte(perl), 0o644); err != nil { // owned by root
		t.Fatal(err)
	}
	if b, _ := os.ReadFile("/proc/sys/fs/protected_hardlinks"); strings.TrimSpace(string(b)) != "1" {
		t.Logf("fs.protected_hardlinks is not 1 here, so the link succeeds and the copy is not exercised")
	}
	c := startChild(t, "-u", "nobody", "-s", "0.017", "127.0.0.1:0", state)
	var got bytes.Buffer
	for range 500 { // the first save comes after about a second
		got.Reset()
		if dumpFile(state, &got) == nil && !bytes.HasPrefix(mustRead(t, state), []byte("I ")) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if bytes.HasPrefix(mustRead(t, state), []byte("I ")) {
		t.Fatalf("no snapshot replaced the Perl file:\n%s", c.log.String())
	}
	if kept := mustRead(t, state+".perl"); string(kept) != perl {
		t.Fatalf("kept original %q, want %q", kept, perl)
	}
	if err := stopChild(t, c); err != nil {
		t.Fatalf("exit: %v\n%s", err, c.log.String())
	}
	if strings.Contains(c.log.String(), "error") {
		t.Errorf("errors logged:\n%s", c.log.String())
	}
	if !strings.Contains(got.String(), "I ") || strings.Count(got.String(), "G ") != 1 {
		t.Errorf("snapshot lost the Perl entries:\n%s", got.String())
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// runChildToExit runs the test binary as a child daemon with args and
// returns its exit error and stderr; the child must stop by itself.
func runChildToExit(t *testing.T, args ...string) (stderr string, err error) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childDaemonEnv+"="+strings.Join(args, "\n"))
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return errOut.String(), err
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("the daemon did not stop by itself within 30 s: %s", errOut.String())
	}
	return "", nil
}

// TestUnusableStatePathsRefusedAtStart checks that a state path the daemon
// could not save to is refused at start, as the user it runs as, with what
// to change, instead of at the first save ten minutes later.
func TestUnusableStatePathsRefusedAtStart(t *testing.T) {
	base := t.TempDir()
	fifo := filepath.Join(base, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		state string
		want  string
	}{
		{"missing directory", filepath.Join(base, "nope", "state"), `does not exist; create it: mkdir -p "` + filepath.Join(base, "nope") + `"`},
		{"named pipe", fifo, `state file "` + fifo + `" is not a regular file (a named pipe)`},
		{"directory", base, "is not a regular file (a directory)"},
	} {
		stderr, err := runChildToExit(t, "127.0.0.1:0", tt.state)
		if err == nil || !strings.Contains(stderr, tt.want) {
			t.Errorf("%s: exit %v, stderr %q; want an error containing %q", tt.name, err, stderr, tt.want)
		}
	}
	requireRoot(t, "for the -u cases")
	rootDir, _, _ := nobodyDir(t, false)
	stderr, err := runChildToExit(t, "-u", "nobody", "127.0.0.1:0", filepath.Join(rootDir, "state"))
	if want := `as user nobody (uid 65534): open `; err == nil || !strings.Contains(stderr, "cannot create files in") || !strings.Contains(stderr, want) ||
		!strings.Contains(stderr, "make it writable by that user (chown nobody \""+rootDir) {
		t.Errorf("unwritable directory: exit %v, stderr %q", err, stderr)
	}
	ownDir, _, _ := nobodyDir(t, true)
	unreadable := filepath.Join(ownDir, "state")
	os.WriteFile(unreadable, []byte("I 1 192.0.2.1\n"), 0o600) // root's, after -u was added
	stderr, err = runChildToExit(t, "-u", "nobody", "127.0.0.1:0", unreadable)
	if err == nil || !strings.Contains(stderr, `cannot read state file "`+unreadable+`" as user nobody`) ||
		!strings.Contains(stderr, "(chown nobody \""+unreadable) {
		t.Errorf("unreadable state file: exit %v, stderr %q", err, stderr)
	}
}

// TestFinalSaveFailureExitsNonZero removes the state directory under a
// running daemon: its final save fails, it says so without promising a
// retry, and run returns an error (exit status 1).
func TestFinalSaveFailureExitsNonZero(t *testing.T) {
	dir := t.TempDir()
	cfg := defaultConfig()
	cfg.StateFile = filepath.Join(dir, "sub", "state")
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	td := startTestDaemon(t, settingsOf(t, cfg), newFakeClock().now, nil)
	exchange(t, dial(t, td.addr), req("192.0.2.1", alice, bob), 5*time.Second)
	os.RemoveAll(filepath.Join(dir, "sub"))
	err := td.stop(t)
	if err == nil || !strings.Contains(err.Error(), "the final save failed") {
		t.Fatalf("run returned %v, want the final save's failure", err)
	}
	if log := td.errOut.String(); !strings.Contains(log, "cannot save state (shutdown)") || strings.Contains(log, "will retry") {
		t.Errorf("log:\n%s", log)
	}
	if code := exitCode(err, io.Discard, io.Discard); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
}

// TestListenErrorNamesKeyAndFile checks that a listen value that passes the
// syntax check but cannot be used names the key and the file's line.
func TestListenErrorNamesKeyAndFile(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "g.toml")
	// A name that is not a host name fails in the resolver without asking
	// any server.
	os.WriteFile(conf, []byte(fmt.Sprintf("state_file = %q\nlisten = \"bad_host!:1999\"\n", filepath.Join(dir, "state"))), 0o644)
	d := newDaemon(fromArgs("-c", conf), io.Discard, io.Discard)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second) // were it to start, it would stop
	defer cancel()
	err := d.run(ctx)
	if err == nil || !strings.Contains(err.Error(), conf+":2: listen: cannot resolve listen address") {
		t.Fatalf("got %v, want an error naming %s:2 and listen", err, conf)
	}
}
