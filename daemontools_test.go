package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRealDaemontools runs greydaemon under Debian's daemontools (svscan,
// supervise, multilog, svc, svstat) from a service directory built from
// contrib/daemontools as shipped, with only paths, the port and the users
// substituted: decisions appear in multilog's current file, svc -h
// reloads the whitelist, a SIGUSR1 sent as the run script says saves, svc
// -t restarts with the state kept, and svc -d stops after a final save.
func TestRealDaemontools(t *testing.T) {
	requireRoot(t, "to run supervise's scripts with setuidgid and -u")
	svscan := requireTool(t, "svscan", "daemontools")
	svc := requireTool(t, "svc", "daemontools")
	svstat := requireTool(t, "svstat", "daemontools")
	requireTool(t, "multilog", "daemontools")

	dir, _, _ := nobodyDir(t, true)
	bin := filepath.Join(dir, "greydaemon")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	os.Chmod(dir, 0o755)
	port := freeUDPPort(t)
	state := filepath.Join(dir, "greydata")
	whitelist := filepath.Join(dir, "whitelist")
	scan := filepath.Join(dir, "service")
	svcDir := filepath.Join(scan, "greydaemon")
	os.MkdirAll(filepath.Join(svcDir, "log"), 0o755)
	substitute := func(src, dst string, pairs ...string) {
		text := string(mustRead(t, src))
		for i := 0; i < len(pairs); i += 2 {
			if !strings.Contains(text, pairs[i]) {
				t.Fatalf("%s no longer holds %q", src, pairs[i])
			}
			text = strings.ReplaceAll(text, pairs[i], pairs[i+1])
		}
		if err := os.WriteFile(dst, []byte(text), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	substitute("contrib/daemontools/run", filepath.Join(svcDir, "run"),
		"/usr/local/bin/greydaemon", bin, "-u greyd", "-u nobody", "/etc/greydaemon/whitelist", whitelist,
		"127.0.0.1 /var/lib/greydaemon/greydata", fmt.Sprintf("127.0.0.1:%d %s", port, state))
	substitute("contrib/daemontools/log/run", filepath.Join(svcDir, "log", "run"), "LOGUSER=qmaill", "LOGUSER=nobody")
	os.WriteFile(whitelist, []byte("# none yet\n"), 0o644)

	scanner := exec.Command(svscan, scan)
	scanner.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := scanner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command(svc, "-dx", svcDir, filepath.Join(svcDir, "log")).Run()
		time.Sleep(200 * time.Millisecond)
		syscall.Kill(-scanner.Process.Pid, syscall.SIGKILL)
		scanner.Wait()
	})
	current := filepath.Join(svcDir, "log", "main", "current")
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for range 300 {
			if ok() {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		log, _ := os.ReadFile(current)
		t.Fatalf("%s: not within 15 s; multilog's current:\n%s", what, log)
	}
	logHas := func(re string) func() bool {
		return func() bool {
			b, _ := os.ReadFile(current)
			return regexp.MustCompile(re).Match(b)
		}
	}
	pidRe := regexp.MustCompile(`up \(pid (\d+)\)`)
	pid := func() int {
		out, _ := exec.Command(svstat, svcDir).Output()
		m := pidRe.FindSubmatch(out)
		if m == nil {
			return 0
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	waitFor("the daemon listening", logHas(`greydaemon: listening on 127\.0\.0\.1:\d+ for qmail`))
	first := pid()
	conn := dial(t, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("first request: %x", got)
	}
	waitFor("the decision line in multilog's current, timestamped", logHas(`(?m)^@4[0-9a-f]{23} 127\.0\.0\.1:\d+ new grey I192\.0\.2\.1 `))

	// svc -h: the whitelist, changed meanwhile, is reloaded.
	os.WriteFile(whitelist, []byte("198.51.100.0/24\n"), 0o644)
	exec.Command(svc, "-h", svcDir).Run()
	waitFor("the reload", logHas(`reloaded settings: 1 whitelist ranges`))
	if got := exchange(t, conn, req("198.51.100.7", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 1}) {
		t.Fatalf("after svc -h, a whitelisted client: %x", got)
	}
	// SIGUSR1 as the run script says: kill -USR1 with svstat's pid.
	syscall.Kill(first, syscall.SIGUSR1)
	waitFor("the SIGUSR1 save", logHas(`saved 0 known IPs and 1 grey triplets to .*\(SIGUSR1\)`))
	if n := greyInState(t, state); n != 1 {
		t.Fatalf("after SIGUSR1 the state file holds %d grey triplets, want 1", n)
	}

	// svc -t: a new process, which loads the state the old one saved.
	exchange(t, conn, req("192.0.2.2", alice, bob), 5*time.Second)
	exec.Command(svc, "-t", svcDir).Run()
	waitFor("a restarted daemon", func() bool { p := pid(); return p != 0 && p != first })
	waitFor("the state loaded at the restart", logHas(`loaded msgpack state file .*: 0 known IPs, 2 grey triplets`))
	if got := exchange(t, conn, req("192.0.2.2", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 2}) {
		t.Fatalf("after svc -t, a retry too soon: %x, want 0002 (the triplet was kept)", got)
	}

	// svc -d: stopped, after a final save.
	exchange(t, conn, req("192.0.2.3", alice, bob), 5*time.Second)
	exec.Command(svc, "-d", svcDir).Run()
	waitFor("the daemon down", func() bool {
		out, _ := exec.Command(svstat, svcDir).Output()
		return bytes.Contains(out, []byte(": down "))
	})
	if n := greyInState(t, state); n != 3 {
		t.Fatalf("after svc -d the state file holds %d grey triplets, want 3", n)
	}
}

// freeUDPPort returns a UDP port on 127.0.0.1 that nothing was bound to a
// moment ago, for a program that takes its port on the command line.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}
