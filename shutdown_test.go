package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// shutdownBound is the time the docs promise: after SIGTERM the daemon
// saves and exits within it (plus the time the save itself takes), whatever
// its peers do.
const shutdownBound = 10 * time.Second

// TestBoundedShutdownWithStuckPeers runs the daemon in a child process with
// every peer stuck at once: stdout and stderr on pipes nobody reads, a
// Postfix client that sends requests but never reads the replies, idle
// greylistd and metrics connections, and Redis stopped (SIGSTOP). The
// daemon keeps answering qmail throughout, and after SIGTERM it saves and
// exits 0 within shutdownBound plus a second's margin.
func TestBoundedShutdownWithStuckPeers(t *testing.T) {
	_, redis := startRedis(t, 0)
	redisPort := redis.Args[2]
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	cfg := writeConfig(t, dir, `policy_listen = "127.0.0.1:0"`, `metrics_listen = "127.0.0.1:0"`, `milter_listen = "127.0.0.1:0"`,
		fmt.Sprintf("greylistd_listen = %q", filepath.Join(dir, "greylistd.sock")),
		fmt.Sprintf("redis_url = \"redis://127.0.0.1:%s/0\"", redisPort), `redis_fallback = "local"`)

	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer outR.Close()
	defer errR.Close()
	if _, err := unix.FcntlInt(errW.Fd(), unix.F_SETPIPE_SZ, 4096); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childDaemonEnv+"=-c\n"+cfg)
	cmd.Stdout, cmd.Stderr = outW, errW
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	outW.Close()
	errW.Close()
	var exitErr error
	done := make(chan struct{})
	go func() { exitErr = cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })

	// Read stderr until every front end listens, then never again.
	addrs := map[string]string{}
	sc := bufio.NewScanner(errR)
	for len(addrs) < 5 && sc.Scan() {
		if a, ok := strings.CutPrefix(sc.Text(), "greydaemon: listening on "); ok {
			addr, name, _ := strings.Cut(a, " for ")
			addrs[name] = addr
		}
	}
	if len(addrs) < 5 {
		t.Fatalf("front ends listening: %v", addrs)
	}
	qmail, err := net.ResolveUDPAddr("udp", addrs["qmail"])
	if err != nil {
		t.Fatal(err)
	}
	conn := dial(t, qmail)

	// Fill stdout's pipe (64 KiB) with decision lines, and stderr's (4 KiB)
	// with reload messages: every request is still answered.
	for i := range 2000 {
		if got := exchange(t, conn, req("192.0.2.1", alice, fmt.Sprintf("r%d@rcpt.example", i)), 5*time.Second); len(got) != 2 {
			t.Fatalf("request %d with stdout stuck: reply %x", i, got)
		}
	}
	for range 60 { // signals sent together would merge into one
		cmd.Process.Signal(syscall.SIGHUP)
		time.Sleep(20 * time.Millisecond)
	}
	waitPipeFull(t, "stdout", outR, 60_000)
	waitPipeFull(t, "stderr", errR, 3_500)

	// A Postfix client that writes requests and never reads, with a small
	// receive buffer: once the replies fill it, the server's writes block,
	// the server stops reading, and the client's writes block too.
	policy, err := net.Dial("tcp", addrs["postfix"])
	if err != nil {
		t.Fatal(err)
	}
	defer policy.Close()
	policy.(*net.TCPConn).SetReadBuffer(4096)
	jammed := make(chan struct{})
	go func() {
		defer close(jammed)
		for i := 0; i < 1_000_000; i++ {
			policy.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := policy.Write([]byte(policyRequestText("192.0.2.9", alice, fmt.Sprintf("p%d@rcpt.example", i)))); err != nil {
				return
			}
		}
	}()
	select {
	case <-jammed:
	case <-time.After(30 * time.Second):
		t.Fatal("the Postfix connection did not jam within 30 s")
	}
	// A milter conversation that sends recipients and never reads, jammed
	// the same way, and an idle one.
	jammedMilter(t, addrs["milter"])
	idleMilter, err := net.Dial("tcp", addrs["milter"])
	if err != nil {
		t.Fatal(err)
	}
	defer idleMilter.Close()
	// Idle greylistd and metrics connections.
	for range 5 {
		c, err := net.Dial("unix", addrs["greylistd"])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	for range 20 {
		c, err := net.Dial("tcp", addrs["metrics"])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	// Redis stops answering; qmail is answered by the fallback.
	redis.Process.Signal(syscall.SIGSTOP)
	defer redis.Process.Signal(syscall.SIGCONT)
	if got := exchange(t, conn, req("192.0.2.2", alice, bob), 5*time.Second); len(got) != 2 {
		t.Fatalf("request with Redis stopped: reply %x", got)
	}
	start := time.Now()
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		t.Logf("stopped %v after SIGTERM", time.Since(start).Round(time.Millisecond))
		if exitErr != nil {
			t.Fatalf("exit: %v", exitErr)
		}
	case <-time.After(shutdownBound + time.Second):
		t.Fatalf("still running %v after SIGTERM", shutdownBound+time.Second)
	}
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("no final save: %v", err)
	}
	if got := greyInState(t, state); got == 0 {
		t.Errorf("the final save holds no grey triplets")
	}
}

// waitPipeFull waits up to 10 s until the pipe read by r holds at least n
// unread bytes: its writer is stuck.
func waitPipeFull(t *testing.T, name string, r *os.File, n int) {
	t.Helper()
	got := 0
	for range 1000 {
		got, _ = unix.IoctlGetInt(int(r.Fd()), unix.TIOCINQ)
		if got >= n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: %d bytes waiting in the pipe, want at least %d", name, got, n)
}

// jammedMilter opens a milter conversation at addr that negotiates, then
// sends RCPT packets and never reads the replies, until its writes block.
func jammedMilter(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.(*net.TCPConn).SetReadBuffer(4096)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(milterPacket('O', "\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"))
	if _, err := c.Read(make([]byte, 512)); err != nil {
		t.Fatalf("milter negotiation: %v", err)
	}
	c.Write(milterPacket('C', "client.example\x004\x10\x00192.0.2.8\x00"))
	c.Write(milterPacket('M', "<alice@sender.example>\x00"))
	for i := 0; i < 1_000_000; i++ {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := c.Write(milterPacket('R', fmt.Sprintf("<m%d@rcpt.example>\x00", i))); err != nil {
			return
		}
	}
	t.Fatal("the milter conversation did not jam")
}
