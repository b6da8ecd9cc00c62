package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// startListDaemon runs a daemon with the greylistd socket in a temporary
// directory and returns it and the socket's path.
func startListDaemon(t *testing.T, clock *fakeClock, edit func(*Config)) (*testDaemon, string) {
	t.Helper()
	cfg := defaultConfig()
	cfg.GreylistdListen = filepath.Join(t.TempDir(), "greylistd.sock")
	if edit != nil {
		edit(&cfg)
	}
	return startTestDaemon(t, settingsOf(t, cfg), clock.now, nil), cfg.GreylistdListen
}

// askSocket sends request on a new connection to the socket at path, as
// Exim's readsocket does (closing its side after the request when
// closeWrite is set; greylistd's greylist tool does not), and returns the
// answer.
func askSocket(t testing.TB, path, request string, closeWrite bool) string {
	t.Helper()
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	if closeWrite {
		c.(*net.UnixConn).CloseWrite()
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the answer to %.80q: %v", request, err)
	}
	return string(b)
}

func TestListSocket(t *testing.T) {
	clock := newFakeClock()
	td, path := startListDaemon(t, clock, func(c *Config) { c.GreylistdRetryMin = Duration{time.Minute} })
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket %v, %v; want a socket with mode 0660", fi, err)
	}
	const data = "--grey 192.0.2.0 a@example.org b@example.net"
	if got := askSocket(t, path, data, true); got != "true" {
		t.Fatalf("first request answered %q, want true (no newline)", got)
	}
	// The greylist tool's way: no newline, no end of input; the answer
	// comes anyway.
	if got := askSocket(t, path, "status 192.0.2.0 a@example.org b@example.net", false); got != "grey" {
		t.Fatalf("status answered %q", got)
	}
	clock.advance(61 * time.Second)
	if got := askSocket(t, path, data+"\n", true); got != "false" {
		t.Fatalf("retry after retry_min answered %q, want false", got)
	}
	if got := askSocket(t, path, "", true); got != "error: No data received" {
		t.Fatalf("empty request answered %q", got)
	}
	// One read of up to 16 KB: the rest of a longer request is not read.
	long := "add " + strings.Repeat("x", 20000)
	if got := askSocket(t, path, long, false); got != "Added to whitelist" {
		t.Fatalf("long request answered %.80q", got)
	}
	// Many clients at once.
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			for j := range 20 {
				if got := askSocket(t, path, "update c"+itoa(i)+" "+itoa(j), true); got != "grey" {
					t.Errorf("concurrent update answered %q", got)
					return
				}
			}
		})
	}
	wg.Wait()
	var st Stats
	td.UpdateStats(&st)
	var fe *FrontEndStats
	for i := range st.FrontEnds {
		if st.FrontEnds[i].Name == "greylistd" {
			fe = &st.FrontEnds[i]
		}
	}
	if fe == nil || fe.Requests != 5+32*20 || fe.Replies != fe.Requests || fe.Malformed != 1 || st.ListEntries != 2+32*20 {
		t.Fatalf("stats: front end %+v, %d greylistd entries; want 645 requests and replies, 1 malformed, 642 entries", fe, st.ListEntries)
	}

	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after stop: %v", err)
	}
	for _, want := range []string{"greylistd update true 192.0.2.0 a@example.org b@example.net\n", "greylistd update false 192.0.2.0"} {
		if !strings.Contains(td.out.String(), want) {
			t.Errorf("decision log lacks %q:\n%.2000s", want, td.out.String())
		}
	}
}

// TestListSocketFile checks what start-up does with what it finds at the
// socket's path: a socket left by an earlier run is replaced, one that a
// process listens on is refused, and so is any other file.
func TestListSocketFile(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	clock := newFakeClock()
	td, _ := startListDaemon(t, clock, func(c *Config) { c.GreylistdListen = stale })
	if got := askSocket(t, stale, "update x", true); got != "grey" {
		t.Fatalf("daemon on a stale socket file answered %q", got)
	}
	cfg := defaultConfig()
	cfg.GreylistdListen = stale
	err = newDaemon(settingsOf(t, cfg), io.Discard, io.Discard).run(t.Context())
	if err == nil || !strings.Contains(err.Error(), "another process is listening") || !strings.Contains(err.Error(), "greylistd_listen") {
		t.Fatalf("second daemon on a live socket: %v", err)
	}
	td.stop(t)

	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("keep me"), 0o644)
	cfg.GreylistdListen = plain
	err = newDaemon(settingsOf(t, cfg), io.Discard, io.Discard).run(t.Context())
	if err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("daemon on a regular file: %v", err)
	}
	if b, _ := os.ReadFile(plain); string(b) != "keep me" {
		t.Fatal("the regular file was touched")
	}
}

// TestListSurvivesRestart is the difference from greylistd: an entry
// white before a restart is white after it.
func TestListSurvivesRestart(t *testing.T) {
	clock := newFakeClock()
	state := filepath.Join(t.TempDir(), "state")
	edit := func(c *Config) { c.StateFile = state; c.GreylistdRetryMin = Duration{time.Minute} }
	td, path := startListDaemon(t, clock, edit)
	askSocket(t, path, "192.0.2.0 a@example.org b@example.net", true)
	clock.advance(2 * time.Minute)
	if got := askSocket(t, path, "192.0.2.0 a@example.org b@example.net", true); got != "white" {
		t.Fatalf("retry answered %q", got)
	}
	askSocket(t, path, "192.0.2.9 c@example.org d@example.net", true) // grey
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	td, path = startListDaemon(t, clock, edit)
	defer td.stop(t)
	if got := askSocket(t, path, "check 192.0.2.0 a@example.org b@example.net", true); got != "white" {
		t.Fatalf("after a restart, the white entry is %q", got)
	}
	// The grey entry keeps its first-seen time: a minute after it, not
	// after the restart, it passes.
	if got := askSocket(t, path, "status 192.0.2.9 c@example.org d@example.net", true); got != "grey" {
		t.Fatalf("after a restart, the grey entry is %q", got)
	}
	clock.advance(61 * time.Second)
	if got := askSocket(t, path, "192.0.2.9 c@example.org d@example.net", true); got != "white" {
		t.Fatalf("after a restart, the grey entry's retry answered %q", got)
	}
}

// TestListSaveCommand checks that the save command writes the state file.
func TestListSaveCommand(t *testing.T) {
	clock := newFakeClock()
	state := filepath.Join(t.TempDir(), "state")
	td, path := startListDaemon(t, clock, func(c *Config) { c.StateFile = state })
	defer td.stop(t)
	askSocket(t, path, "add --black spammer", true)
	if got := askSocket(t, path, "save", true); got != "greylistd data has been saved" {
		t.Fatalf("save answered %q", got)
	}
	data, err := os.ReadFile(state)
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	_, err = decodeSnapshot(data, func(int, [16]byte, uint32) bool { return true }, func(k listKey, e listEntry) bool {
		found = found || k == listKeyOf([]byte("spammer")) && e.state == listBlack
		return true
	})
	if err != nil || !found {
		t.Fatalf("the saved snapshot (%v) lacks the black entry", err)
	}
}

// TestGreylistCommand runs the greylist subcommand against a daemon and
// checks its output and exit codes, which are greylistd's greylist tool's.
func TestGreylistCommand(t *testing.T) {
	clock := newFakeClock()
	_, path := startListDaemon(t, clock, nil)
	for _, tc := range []struct {
		args []string
		out  string
		code int
	}{
		{[]string{"update", "192.0.2.0", "a", "b"}, "grey\n", 1},
		{[]string{"check", "--grey", "192.0.2.0", "a", "b"}, "true\n", 0},
		{[]string{"add", "--black", "x"}, "Added to blacklist\n", 0},
		{[]string{"check", "x"}, "black\n", 2},
		{[]string{"delete", "y"}, "error: Not found\n", 255},
		{[]string{"check", "--white", "x"}, "false\n", 1},
		{[]string{"STATUS", "x"}, "black\n", 2},
	} {
		var out, errOut bytes.Buffer
		args := append([]string{"greylist", "-socket", path}, tc.args...)
		code := exitCode(run(args, &out, &errOut, nil), &out, &errOut)
		if out.String() != tc.out || code != tc.code {
			t.Errorf("greylist %q: printed %q (stderr %q), exit %d; want %q, exit %d", tc.args, out.String(), errOut.String(), code, tc.out, tc.code)
		}
	}
	var out, errOut bytes.Buffer
	if code := exitCode(run([]string{"greylist", "-socket", path, "frobnicate", "x"}, &out, &errOut, nil), &out, &errOut); code == 0 || !strings.Contains(errOut.String(), "invalid action") {
		t.Errorf("invalid action: exit %d, stderr %q", code, errOut.String())
	}
	errOut.Reset()
	if code := exitCode(run([]string{"greylist", "-socket", filepath.Join(t.TempDir(), "none"), "stats"}, &out, &errOut, nil), &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "cannot connect") {
		t.Errorf("no daemon: exit %d, stderr %q", code, errOut.String())
	}
	// -c: the socket is the config's greylistd_listen.
	conf := filepath.Join(t.TempDir(), "g.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("greylistd_listen = %q\n", path)), 0o644)
	out.Reset()
	if code := exitCode(run([]string{"greylist", "-c", conf, "check", "x"}, &out, &errOut, nil), &out, &errOut); code != 2 || out.String() != "black\n" {
		t.Errorf("greylist -c: printed %q, exit %d; want black, 2", out.String(), code)
	}
	// A socket that closes without answering: exit 1, said on stderr.
	mute := filepath.Join(t.TempDir(), "mute.sock")
	ln, err := net.Listen("unix", mute)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Read(make([]byte, 1024)) // the request, then nothing
			c.Close()
		}
	}()
	errOut.Reset()
	if code := exitCode(run([]string{"greylist", "-socket", mute, "check", "x"}, &out, &errOut, nil), &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "no answer") {
		t.Errorf("empty answer: exit %d, stderr %q; want 1 and \"no answer\"", code, errOut.String())
	}
}

// TestListSocketActivation passes a listening unix socket to a child daemon
// as systemd does (greydaemon.socket's ListenStream=): the daemon answers
// greylistd requests on it, and leaves its file, the service manager's,
// where it is when it stops.
func TestListSocketActivation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "greylistd.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	conf := writeTemp(t, "g.toml", "greylistd_listen = \""+path+"\"\n")
	c := startChildCmd(t, activatedChildCmd(f), "-c", conf, "127.0.0.1:0", filepath.Join(dir, "state"))
	f.Close()
	c.waitLog(t, "greylistd_listen: using the socket "+path+" passed by the service manager")
	if got := askSocket(t, path, "update 192.0.2.0 a b", true); got != "grey" {
		t.Fatalf("answer on the passed socket: %q", got)
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, c.log.String())
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the passed socket's file was removed: %v", err)
	}
}

// TestListSaveCommandsCoalesce sends save commands from 16 clients at once
// for 7 seconds: each is answered, by one save at once and then at most
// one per 5 s (saveRequestFloor) for all that came meanwhile.
func TestListSaveCommandsCoalesce(t *testing.T) {
	clock := newFakeClock()
	var saves atomic.Int64
	cfg := defaultConfig()
	cfg.GreylistdListen = filepath.Join(t.TempDir(), "greylistd.sock")
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, func(d *daemon) {
		d.onSave = func(saveStats, error) { saves.Add(1) }
	})
	defer td.stop(t)
	start := time.Now()
	var wg sync.WaitGroup
	var answered atomic.Int64
	for range 16 {
		wg.Go(func() {
			for time.Since(start) < 7*time.Second {
				if got := askSocket(t, cfg.GreylistdListen, "save", true); got != "greylistd data has been saved" {
					t.Errorf("save answered %q", got)
					return
				}
				answered.Add(1)
			}
		})
	}
	wg.Wait()
	// At 0 s, then at about 5 s and 10 s for the requests still waiting.
	if n := saves.Load(); n < 2 || n > 3 {
		t.Fatalf("%d saves for %d save commands in 7 s; want 2 or 3", n, answered.Load())
	}
	t.Logf("%d saves for %d save commands in 7 s", saves.Load(), answered.Load())
}

// TestStopLineCountsEveryFrontEnd checks the shutdown line: the requests
// of every front end, in all and by front end.
func TestStopLineCountsEveryFrontEnd(t *testing.T) {
	td, path := startListDaemon(t, newFakeClock(), nil)
	conn := dial(t, td.addr)
	for i := range 2 {
		exchange(t, conn, req("192.0.2.1", alice, fmt.Sprintf("r%d@x", i)), 5*time.Second)
	}
	for i := range 3 {
		askSocket(t, path, fmt.Sprintf("update x%d", i), true)
	}
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	if want := "greydaemon: stopped: 5 requests (qmail 2, greylistd 3), 0 malformed, 0 refused, 5 replies\n"; !strings.Contains(td.errOut.String(), want) {
		t.Errorf("no %q in:\n%s", want, td.errOut.String())
	}
}

// TestListMetrics checks the greylistd socket's metrics: its answers by
// command and list, its requests, and no qmail-style decision series for
// it (they cannot happen); and, where promtool is installed, that the
// whole endpoint's text passes `promtool check metrics`.
func TestListMetrics(t *testing.T) {
	td, path := startListDaemon(t, newFakeClock(), func(c *Config) { c.MetricsListen = "127.0.0.1:0" })
	for _, r := range []string{"update a", "update b", "update a", "add --black c", "delete nothing", "status c", "status d", "check --white a"} {
		askSocket(t, path, r, true)
	}
	text := scrape(t, td.addrs["metrics"])
	for series, want := range map[string]float64{
		`greydaemon_greylistd_answers_total{command="update",list="grey"}`:  3,
		`greydaemon_greylistd_answers_total{command="update",list="white"}`: 0,
		`greydaemon_greylistd_answers_total{command="add",list="black"}`:    1,
		`greydaemon_greylistd_answers_total{command="delete",list="none"}`:  1,
		`greydaemon_greylistd_answers_total{command="status",list="black"}`: 1,
		`greydaemon_greylistd_answers_total{command="status",list="none"}`:  1,
		`greydaemon_greylistd_answers_total{command="check",list="grey"}`:   1,
		`greydaemon_requests_total{frontend="greylistd"}`:                   8,
		`greydaemon_entries{table="greylistd"}`:                             3,
	} {
		if got := metricValue(text, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if strings.Contains(text, `greydaemon_decisions_total{action="accept",frontend="greylistd"`) {
		t.Errorf("decision series for the greylistd front end, which cannot have them")
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv(requireToolsEnv) != "" {
			t.Fatalf("promtool is not installed (apt-get install prometheus), and %s is set", requireToolsEnv)
		}
		t.Log("promtool is not installed (apt-get install prometheus): the metrics text is not linted")
		return
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
