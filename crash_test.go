package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// childDaemonEnv names the variable that makes the test binary run the
// daemon itself (see TestMain) with the arguments it holds, separated by
// newlines.
const childDaemonEnv = "GREYDAEMON_TEST_DAEMON_ARGS"

// runChildDaemonIfAsked runs the daemon when the test binary was started as
// a child daemon, and exits.
func runChildDaemonIfAsked() {
	args, ok := os.LookupEnv(childDaemonEnv)
	if !ok {
		return
	}
	os.Exit(runMain(strings.Split(args, "\n")))
}

// A childDaemon is the daemon running in a child process.
type childDaemon struct {
	cmd  *exec.Cmd
	addr *net.UDPAddr
	log  *syncBuffer // everything it wrote to stderr so far
}

// startChild starts a child daemon with args and waits until it listens.
func startChild(t *testing.T, args ...string) *childDaemon {
	t.Helper()
	return startChildCmd(t, exec.Command(os.Args[0], "-test.run=^$"), args...)
}

// startChildCmd starts cmd, which must run the test binary, as a child
// daemon with args (in cmd's environment, or this process's if it has
// none), and waits until it listens.
func startChildCmd(t *testing.T, cmd *exec.Cmd, args ...string) *childDaemon {
	t.Helper()
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, childDaemonEnv+"="+strings.Join(args, "\n"))
	if cmd.Stdout == nil {
		cmd.Stdout = io.Discard
	}
	pipe, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	c := &childDaemon{cmd: cmd, log: &syncBuffer{}}
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pipe)
		listening := false
		for sc.Scan() {
			line := sc.Text()
			c.log.Write([]byte(line + "\n"))
			if a, ok := strings.CutPrefix(line, "greydaemon: listening on "); ok && strings.HasSuffix(a, " for qmail") && !listening {
				listening = true
				found <- strings.TrimSuffix(a, " for qmail")
			}
		}
		if !listening {
			found <- "failed: " + c.log.String()
		}
	}()
	select {
	case a := <-found:
		addr, err := net.ResolveUDPAddr("udp", a)
		if err != nil {
			t.Fatalf("child did not start: %s", a)
		}
		c.addr = addr
	case <-time.After(30 * time.Second):
		t.Fatal("child did not start within 30 s")
	}
	return c
}

// waitLog waits up to 10 s for the child's stderr to contain s.
func (c *childDaemon) waitLog(t *testing.T, s string) {
	t.Helper()
	for range 1000 {
		if strings.Contains(c.log.String(), s) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the child did not log %q:\n%s", s, c.log.String())
}

// TestSnapshotSurvivesSIGKILL runs the daemon as a child process with a
// large state, keeps requests flowing, asks for a save and kills the child
// with SIGKILL at a random moment during it, 20 times. Every time, the
// snapshot on disk must load whole, and no temporary file may outlive the
// next start.
func TestSnapshotSurvivesSIGKILL(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	// A 400,000-entry snapshot takes long enough to write that the kills
	// land in the middle of saves.
	realClock := func() time.Time { return time.Now() }
	seed := &snapshotter{path: path, table: newTable(defaultShards, 1_000_000), policy: testPolicyFunc, now: realClock}
	now := uint32(time.Now().Unix())
	for i := range uint64(400_000) {
		seed.table.observeTriplet(tkey(i), now, 300, 43200, testExpiry)
	}
	if _, err := seed.save(); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(7, 8))
	loaded, midSave, grown := 0, 0, 0
	last := 400_000
	for round := range 20 {
		c := startChild(t, "127.0.0.1:0", path)
		conn, err := net.DialUDP("udp", nil, c.addr)
		if err != nil {
			t.Fatal(err)
		}
		// One new triplet answered before the save: a save that completes
		// holds it, so the snapshot grows.
		if got := exchange(t, conn, req("10.9.8.6", alice, fmt.Sprintf("round%d@x", round)), 5*time.Second); len(got) != 2 {
			t.Fatalf("round %d: no reply", round)
		}
		// Requests flow while the save runs; their new triplets make each
		// snapshot differ from the last.
		ctx, stopLoad := context.WithCancel(context.Background())
		loadDone := make(chan struct{})
		go func() {
			defer close(loadDone)
			for i := 0; i < 100_000 && ctx.Err() == nil; i++ {
				conn.Write(req("10.9.8.7", alice, "r"+string(rune('a'+round))+string(rune('a'+i%26))+"@x"))
				time.Sleep(100 * time.Microsecond)
			}
		}()
		c.cmd.Process.Signal(syscall.SIGUSR1)
		wait := time.Duration(r.IntN(25_000)) * time.Microsecond // usually during the save
		if round%5 == 4 {
			wait = 500 * time.Millisecond // long enough for the save to complete
		}
		time.Sleep(wait)
		c.cmd.Process.Kill()
		c.cmd.Wait()
		stopLoad()
		<-loadDone
		conn.Close()

		if leftovers, _ := filepath.Glob(path + ".tmp-*"); len(leftovers) > 0 {
			midSave++
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("round %d: snapshot gone after SIGKILL: %v", round, err)
		}
		st, err := decodeSnapshot(data, func(int, [16]byte, uint32) bool { return true }, nil)
		if err != nil {
			t.Fatalf("round %d: snapshot damaged by SIGKILL: %v", round, err)
		}
		if st.grey < last {
			t.Fatalf("round %d: snapshot holds %d triplets, fewer than the %d before", round, st.grey, last)
		}
		if st.grey > last {
			grown++
		}
		last = st.grey
		loaded++
	}
	// The test proves something only if kills landed during saves and
	// some saves completed.
	if midSave == 0 {
		t.Errorf("no kill landed during a save")
	}
	if grown == 0 {
		t.Errorf("no save completed: the snapshot never grew")
	}
	// The next start removes the temporary files that killed saves left.
	c := startChild(t, "127.0.0.1:0", path)
	c.cmd.Process.Signal(syscall.SIGTERM)
	c.cmd.Wait()
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
	t.Logf("%d kills (%d of them during a save, %d after a save that grew the snapshot), every snapshot loaded", loaded, midSave, grown)
}

// TestSaveFailsWithFileSizeLimit lowers RLIMIT_FSIZE so that a save cannot
// be written: the save fails with the cause named, the old snapshot stays,
// no temporary file remains, the daemon keeps answering, and once the limit
// is lifted the next save succeeds.
func TestSaveFailsWithFileSizeLimit(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	cfg := defaultConfig()
	cfg.StateFile = filepath.Join(dir, "state")
	cfg.Listen = "127.0.0.1:0"

	// An old snapshot with one known IP.
	old := newTestSnapshotter(t, cfg.StateFile, clock)
	old.table.markKnown(ckey(1), uint32(clock.now().Unix()), testExpiry)
	if _, err := old.save(); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(cfg.StateFile)

	saved := make(chan error, 10)
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, func(d *daemon) {
		d.saveNow = make(chan struct{})
		d.onSave = func(_ saveStats, err error) { saved <- err }
	})
	d, stderr := td.daemon, td.errOut
	conn := dial(t, td.addr)
	for i := range 2000 {
		if got := exchange(t, conn, req("192.0.2.1", alice, fmt.Sprintf("r%d@rcpt.example", i)), 5*time.Second); got == nil {
			t.Fatalf("request %d got no reply", i)
		}
	}

	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	small := lim
	small.Cur = 4096
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &small); err != nil {
		t.Fatal(err)
	}
	d.saveNow <- struct{}{}
	err := <-saved
	if err2 := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err2 != nil {
		t.Fatal(err2)
	}
	if err == nil || !errors.Is(err, syscall.EFBIG) {
		t.Fatalf("save under a 4 KiB file size limit: %v, want EFBIG", err)
	}
	if !strings.Contains(stderr.String(), "greydaemon: error: cannot save state") {
		t.Errorf("failure not logged:\n%s", stderr.String())
	}
	if after, _ := os.ReadFile(cfg.StateFile); !bytes.Equal(before, after) {
		t.Fatal("the old snapshot changed")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 || entries[0].Name() != "state" || entries[1].Name() != "state.lock" {
		t.Fatalf("directory holds %v after the failed save, want the state file and its lock", entries)
	}
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("after the failed save: reply %x, want 0001", got)
	}
	d.saveNow <- struct{}{}
	if err := <-saved; err != nil {
		t.Fatalf("save after the limit was lifted: %v", err)
	}
}
