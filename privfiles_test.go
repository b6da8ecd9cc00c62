package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// This file tests what the daemon does to files before it drops
// privileges (asuser.go): nothing there may follow a link or race with the
// -u user, who may write the directories involved.

// TestLockFileLinksRefused plants a symlink (to a file, and dangling) and
// a hard link where the lock file goes: the daemon refuses to start, names
// the lock file, and leaves the target as it was.
func TestLockFileLinksRefused(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	const content = "root's own file\n"
	if err := os.WriteFile(secret, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		plant func(lock string) error
		want  string
	}{
		{"symlink", func(lock string) error { return os.Symlink(secret, lock) }, "is a symlink"},
		{"dangling symlink", func(lock string) error { return os.Symlink(filepath.Join(dir, "created"), lock) }, "is a symlink"},
		{"hard link", func(lock string) error { return os.Link(secret, lock) }, "has 2 names"},
		{"fifo", func(lock string) error { return syscall.Mkfifo(lock, 0o644) }, "is not a regular file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			if err := tt.plant(state + ".lock"); err != nil {
				t.Fatal(err)
			}
			cfg := defaultConfig()
			cfg.Listen, cfg.StateFile = "127.0.0.1:0", state
			d := newDaemon(settingsOf(t, cfg), nopWriter{}, nopWriter{})
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second) // a daemon that started stops
			defer cancel()
			err := d.run(ctx)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), state+".lock") {
				t.Fatalf("start: %v; want an error naming the lock file and %q", err, tt.want)
			}
			if got := string(mustRead(t, secret)); got != content {
				t.Errorf("the link's target now holds %q", got)
			}
			if _, err := os.Lstat(filepath.Join(dir, "created")); err == nil {
				t.Errorf("a file was created through the dangling symlink")
			}
		})
	}
}

// nopWriter discards what is written to it.
type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }

// TestFilesCreatedAsTheUser starts the daemon as root with -u nobody in a
// directory nobody owns: the lock file and both unix sockets belong to
// nobody from the start, each socket with its configured group and mode;
// and a socket directory that nobody cannot write is refused with the
// reason, although root could write it.
func TestFilesCreatedAsTheUser(t *testing.T) {
	dir, uid, gid := nobodyDir(t, true)
	const group = "mail" // a group nobody is not in, as postfix or Debian-exim
	mailGID, err := groupID(group)
	if err != nil {
		t.Fatalf("no group %q here (Debian has it): %v", group, err)
	}
	cfg := writeConfig(t, dir, `user = "nobody"`,
		fmt.Sprintf("policy_listen = %q", "unix:"+filepath.Join(dir, "policy")), `policy_socket_mode = "0620"`,
		fmt.Sprintf("policy_socket_group = %q", group),
		fmt.Sprintf("greylistd_listen = %q", filepath.Join(dir, "greylistd")), `greylistd_socket_mode = "0660"`,
		fmt.Sprintf("milter_listen = %q", "unix:"+filepath.Join(dir, "milter")), `milter_socket_mode = "0640"`,
		fmt.Sprintf("milter_socket_group = %q", group))
	c := startChild(t, "-c", cfg)
	for _, f := range []struct {
		name     string
		gid      int
		mode     os.FileMode
		isSocket bool
	}{
		{"state.lock", gid, 0o644, false},
		{"policy", mailGID, 0o620, true},
		{"greylistd", gid, 0o660, true},
		{"milter", mailGID, 0o640, true},
	} {
		fi, err := os.Lstat(filepath.Join(dir, f.name))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if int(st.Uid) != uid || int(st.Gid) != f.gid || fi.Mode().Perm() != f.mode || (fi.Mode()&os.ModeSocket != 0) != f.isSocket {
			t.Errorf("%s: uid %d gid %d mode %v; want uid %d gid %d mode %v", f.name, st.Uid, st.Gid, fi.Mode(), uid, f.gid, f.mode)
		}
	}
	if err := stopChild(t, c); err != nil {
		t.Fatalf("exit: %v\n%s", err, c.log.String())
	}

	rootDir := filepath.Join(dir, "root-only")
	os.Mkdir(rootDir, 0o755) // root's: nobody cannot create files in it
	cfg = writeConfig(t, dir, `user = "nobody"`, fmt.Sprintf("greylistd_listen = %q", filepath.Join(rootDir, "greylistd")))
	stderr, err := runChildToExit(t, "-c", cfg)
	want := `(it is created as user "nobody", who must be able to write its directory): permission denied`
	if err == nil || !strings.Contains(stderr, want) {
		t.Errorf("socket in a directory only root may write: %v, %q; want %q", err, stderr, want)
	}
}

// TestSocketSwapRace runs, as nobody, a process that keeps replacing the
// greylistd socket's name with a symlink to a file only root may read,
// while the daemon (root, -u nobody) starts and stops 15 times. The file
// must stay root's, with its mode: chowning the socket by name after
// creating it gave it to nobody in 11 of 15 starts.
func TestSocketSwapRace(t *testing.T) {
	dir, uid, gid := nobodyDir(t, true)
	secretDir := t.TempDir()
	secret := filepath.Join(secretDir, "secret")
	if err := os.WriteFile(secret, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "greylistd")
	swapper := exec.Command(copyForNobody(t), "-test.run=^$")
	swapper.Env = append(os.Environ(), swapLinkEnv+"="+sock+"\n"+secret)
	swapper.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	in, err := swapper.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, _ := swapper.StdoutPipe()
	if err := swapper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); swapper.Wait() }()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "swapping\n" {
		t.Fatalf("the swapper did not start: %q", line)
	}
	cfg := writeConfig(t, dir, `user = "nobody"`, fmt.Sprintf("greylistd_listen = %q", sock))
	for i := range 15 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childDaemonEnv+"=-c\n"+cfg)
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		time.Sleep(30 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done: // it may have failed: the swapper took the name
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("start %d: the daemon did not stop", i)
		}
		fi, err := os.Stat(secret)
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || fi.Mode().Perm() != 0o600 {
			t.Fatalf("start %d: root's file now has uid %d, mode %v", i, st.Uid, fi.Mode())
		}
	}
}

// swapLinkEnv makes the test binary (see TestMain) replace the socket at
// the name given on its first line with a symlink to the second as soon as
// it appears, over and over, until its standard input closes (at most
// 60 s).
const swapLinkEnv = "GREYDAEMON_TEST_SWAP_LINK"

// runSwapperIfAsked is the child process of TestSocketSwapRace.
func runSwapperIfAsked() {
	spec, ok := os.LookupEnv(swapLinkEnv)
	if !ok {
		return
	}
	name, target, _ := strings.Cut(spec, "\n")
	stop := make(chan struct{})
	go func() { os.Stdin.Read(make([]byte, 1)); close(stop) }()
	fmt.Println("swapping")
	tmp := name + ".swap"
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-stop:
			os.Exit(0)
		default:
		}
		// The attack: as soon as the socket appears, put a symlink in its
		// place; then clear the name for the next start.
		if fi, err := os.Lstat(name); err != nil || fi.Mode()&os.ModeSocket == 0 {
			continue
		}
		os.Remove(tmp)
		os.Symlink(target, tmp)
		os.Rename(tmp, name)
		time.Sleep(20 * time.Millisecond)
		os.Remove(name)
	}
	os.Exit(0)
}

// copyForNobody returns a copy of the test binary that user nobody may run
// (the go tool's build directory is root's alone).
func copyForNobody(t *testing.T) string {
	t.Helper()
	dir, _, _ := nobodyDir(t, false)
	bin := filepath.Join(dir, "greydaemon.test")
	if err := os.WriteFile(bin, mustRead(t, os.Args[0]), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// TestUserWhenNotRoot starts the daemon as nobody with user = "daemon", as
// a service manager's User= with a config that also sets user would: it
// refuses with the cause and the fix, not "cannot drop supplementary
// groups"; and with user = "nobody", itself, it starts.
func TestUserWhenNotRoot(t *testing.T) {
	dir, uid, gid := nobodyDir(t, true)
	bin := copyForNobody(t)
	// run starts the daemon as nobody with -u user and returns what it
	// said on stderr and how it ended: by itself, or by SIGTERM once it
	// was listening.
	run := func(user string) (string, error) {
		cmd := exec.Command(bin, "-test.run=^$")
		cmd.Env = append(os.Environ(), childDaemonEnv+"=-u\n"+user+"\n127.0.0.1:0\n"+filepath.Join(dir, "state"))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
		pipe, err := cmd.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		listening := make(chan struct{}, 1)
		read := make(chan struct{})
		go func() {
			defer close(read)
			sc := bufio.NewScanner(pipe)
			for sc.Scan() {
				stderr.WriteString(sc.Text() + "\n")
				if strings.Contains(sc.Text(), "listening on") {
					listening <- struct{}{}
				}
			}
		}()
		select {
		case <-listening:
			cmd.Process.Signal(syscall.SIGTERM)
		case <-read: // it ended by itself
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
		}
		<-read
		err = cmd.Wait()
		return stderr.String(), err
	}
	out, err := run("daemon")
	if want := `cannot switch to user "daemon": greydaemon already runs as uid ` + fmt.Sprint(uid) + `, and only root can switch; remove user (-u) or start it as root`; err == nil || !strings.Contains(out, want) {
		t.Errorf("as nobody with -u daemon: %v, %q; want %q", err, out, want)
	}
	if out, err := run("nobody"); err != nil || !strings.Contains(out, "listening on") {
		t.Errorf("as nobody with -u nobody: %v, %q; want it to start", err, out)
	}
}
