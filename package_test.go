package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// installTestsEnv names the variable that allows TestDebianPackage to
// install greydaemon's package on this machine (CI sets it).
const installTestsEnv = "GREYDAEMON_INSTALL_TESTS"

// TestDebianPackage builds the Debian package as the README says, checks it
// with lintian (no error, no warning, no information tag left without an
// override), installs it with dpkg, and checks the installed files: the
// config is a conffile, the system user and its state directory exist,
// `greydaemon check` passes on the installed config, systemd-analyze
// verifies the installed unit, and the installed binary, run as the
// packaged user with the installed config, answers a query and saves.
// Then dpkg --purge leaves nothing behind but the user, which Debian
// policy keeps (the test removes it afterwards).
func TestDebianPackage(t *testing.T) {
	requireRoot(t, "to install a package")
	lintian := requireTool(t, "lintian", "lintian")
	dpkg := requireTool(t, "dpkg", "dpkg")
	analyze := requireTool(t, "systemd-analyze", "systemd")
	if os.Getenv(installTestsEnv) == "" {
		msg := "installs greydaemon's package on this machine; set " + installTestsEnv + "=1 to allow it (CI does)"
		if os.Getenv(requireToolsEnv) != "" {
			t.Fatalf("%s, and %s is set", msg, requireToolsEnv)
		}
		t.Skip(msg)
	}
	if exec.Command("dpkg-query", "-W", "greydaemon").Run() == nil {
		t.Fatal("a greydaemon package is installed here already; the test will not replace it")
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	out := run("bash", "scripts/build-deb.sh")
	deb := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	if !strings.HasSuffix(deb, ".deb") {
		t.Fatalf("build-deb.sh printed no package:\n%s", out)
	}
	lint := run(lintian, "-I", "--pedantic", "--fail-on", "error,warning,info", deb)
	for _, line := range strings.Split(lint, "\n") {
		if len(line) > 2 && line[1] == ':' {
			t.Errorf("lintian: %s", line)
		}
	}

	t.Cleanup(func() {
		exec.Command(dpkg, "--purge", "greydaemon").Run()
		exec.Command("deluser", "--system", "greydaemon").Run()
		exec.Command("delgroup", "--system", "greydaemon").Run()
	})
	run(dpkg, "-i", deb)
	conffiles := run("dpkg-query", "-W", "-f", "${Conffiles}", "greydaemon")
	if !strings.Contains(conffiles, "/etc/greydaemon/greydaemon.toml ") {
		t.Errorf("conffiles: %q", conffiles)
	}
	for _, path := range []string{"/usr/sbin/greydaemon", "/lib/systemd/system/greydaemon.service", "/lib/systemd/system/greydaemon.socket",
		"/usr/share/man/man8/greydaemon.8.gz", "/usr/share/doc/greydaemon/copyright", "/usr/share/doc/greydaemon/examples/daemontools/run",
		"/usr/share/doc/greydaemon/examples/postfix/main.cf", "/usr/share/doc/greydaemon/examples/exim/acl_check_rcpt"} {
		if _, err := os.Stat(path); err != nil {
			t.Errorf("installed file: %v", err)
		}
	}
	u, err := user.Lookup("greydaemon")
	if err != nil {
		t.Fatalf("no system user: %v", err)
	}
	fi, err := os.Stat("/var/lib/greydaemon")
	if err != nil || fmt.Sprint(fi.Sys().(*syscall.Stat_t).Uid) != u.Uid || fi.Mode().Perm() != 0o750 {
		t.Fatalf("/var/lib/greydaemon: %v, %v; want the user's, mode 0750", fi, err)
	}
	check := exec.Command("/usr/sbin/greydaemon", "check", "-c", "/etc/greydaemon/greydaemon.toml")
	check.Dir = "/var/lib/greydaemon"
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("greydaemon check on the installed config: %v\n%s", err, out)
	}
	if out, err := exec.Command(analyze, "verify", "/lib/systemd/system/greydaemon.service", "/lib/systemd/system/greydaemon.socket").CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify on the installed units: %v\n%s", err, out)
	}

	// The installed binary as the packaged user, as the unit runs it (only
	// the address and the state file given on the command line, for a free
	// port).
	port := freeUDPPort(t)
	daemon := exec.Command("/usr/sbin/greydaemon", "-c", "/etc/greydaemon/greydaemon.toml",
		fmt.Sprintf("127.0.0.1:%d", port), "/var/lib/greydaemon/greydaemon.state")
	daemon.Dir = "/var/lib/greydaemon"
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	daemon.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	stderr, _ := daemon.StderrPipe()
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	listening := make(chan bool, 1)
	var logged strings.Builder
	go func() {
		sc := bufio.NewScanner(stderr)
		ok := false
		for sc.Scan() {
			logged.WriteString(sc.Text() + "\n")
			if !ok && strings.Contains(sc.Text(), "listening on") {
				ok = true
				listening <- true
			}
		}
		if !ok {
			listening <- false
		}
	}()
	select {
	case ok := <-listening:
		if !ok {
			daemon.Wait()
			t.Fatalf("the installed daemon did not start:\n%s", logged.String())
		}
	case <-time.After(30 * time.Second):
		daemon.Process.Kill()
		t.Fatal("the installed daemon did not start within 30 s")
	}
	conn := dial(t, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Errorf("the installed daemon answered %x, want 0001", got)
	}
	daemon.Process.Signal(syscall.SIGTERM)
	if err := daemon.Wait(); err != nil {
		t.Errorf("the installed daemon's exit: %v", err)
	}
	if fi, err := os.Stat("/var/lib/greydaemon/greydaemon.state"); err != nil || fmt.Sprint(fi.Sys().(*syscall.Stat_t).Uid) != u.Uid {
		t.Errorf("the state file: %v, %v; want one owned by greydaemon", fi, err)
	}

	run(dpkg, "--purge", "greydaemon")
	for _, path := range []string{"/usr/sbin/greydaemon", "/etc/greydaemon", "/var/lib/greydaemon", "/lib/systemd/system/greydaemon.service",
		"/usr/share/doc/greydaemon", "/usr/share/man/man8/greydaemon.8.gz", "/usr/share/lintian/overrides/greydaemon"} {
		if _, err := os.Lstat(path); err == nil {
			t.Errorf("%s is left after dpkg --purge", path)
		}
	}
	if matches, _ := filepath.Glob("/var/lib/systemd/deb-systemd-helper-*/*greydaemon*"); len(matches) > 0 {
		t.Errorf("systemd state left after dpkg --purge: %v", matches)
	}
}
