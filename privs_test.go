package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strings"
	"syscall"
	"testing"
)

// TestMain lets the test binary act as a child process: a daemon (for the
// SIGKILL tests), or a process that drops privileges and reports what it
// has (a process that switched user cannot switch back).
func TestMain(m *testing.M) {
	runChildDaemonIfAsked()
	runSwapperIfAsked()
	if name := os.Getenv("GREYDAEMON_TEST_DROP_TO"); name != "" {
		if err := dropPrivileges(name); err != nil {
			fmt.Println("error:", err)
			os.Exit(3)
		}
		groups, _ := syscall.Getgroups()
		fmt.Printf("uid=%d euid=%d gid=%d egid=%d groups=%v\n",
			syscall.Getuid(), syscall.Geteuid(), syscall.Getgid(), syscall.Getegid(), groups)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestDropPrivileges checks -u: the child ends up with the user's uid, its
// primary gid, no supplementary groups, and cannot regain root. It needs
// root, which CI has.
func TestDropPrivileges(t *testing.T) {
	requireRoot(t, "to switch user")
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Fatalf("no user nobody: %v", err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "GREYDAEMON_TEST_DROP_TO=nobody")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child failed: %v\n%s", err, out)
	}
	want := fmt.Sprintf("uid=%s euid=%s gid=%s egid=%s groups=[]", u.Uid, u.Uid, u.Gid, u.Gid)
	if got := strings.TrimSpace(string(out)); got != want {
		t.Fatalf("child reports %q, want %q", got, want)
	}
}

func TestDropPrivilegesErrors(t *testing.T) {
	for name, want := range map[string]string{
		"no-such-user-greydaemon": `cannot switch to user "no-such-user-greydaemon"`,
		"root":                    "it is root",
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "GREYDAEMON_TEST_DROP_TO="+name)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), want) {
			t.Errorf("-u %s: err %v, output %q; want an error containing %q", name, err, out, want)
		}
	}
}
