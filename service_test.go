package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// This file tests the daemon as a service: readiness and reload reported
// to the service manager, SIGHUP, metrics, the allow list, and one
// instance per address and state file.

// listenNotify makes a fake $NOTIFY_SOCKET and returns a function that
// waits for the next notification.
func listenNotify(t *testing.T) func() string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return func() string {
		t.Helper()
		buf := make([]byte, 4096)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no notification: %v", err)
		}
		return string(buf[:n])
	}
}

// writeConfig writes a config file for a test daemon on 127.0.0.1:0 with
// its state in dir, plus the lines given, and returns its path.
func writeConfig(t *testing.T, dir string, lines ...string) string {
	t.Helper()
	path := filepath.Join(dir, "greydaemon.toml")
	text := fmt.Sprintf("listen = \"127.0.0.1:0\"\nstate_file = %q\n%s\n", filepath.Join(dir, "state"), strings.Join(lines, "\n"))
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// fromArgs returns a load function that reads the command line args, as
// the daemon does at start and at SIGHUP.
func fromArgs(args ...string) func() (*Settings, error) {
	return func() (*Settings, error) { return parseCommandLine(args) }
}

// TestServiceNotifyAndReload runs a daemon under a fake service manager:
// READY=1 once it answers, RELOADING=1 then READY=1 around a SIGHUP,
// STOPPING=1 at shutdown. The reload takes a new whitelist and minimum
// delay from the config file; a bad file is refused with the running
// settings and the table kept.
func TestServiceNotifyAndReload(t *testing.T) {
	next := listenNotify(t)
	dir := t.TempDir()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("198.51.100.0/24\n"), 0o644)
	conf := writeConfig(t, dir, `min_resend_delay = "5m"`, fmt.Sprintf("whitelist = %q", wl))
	clock := newFakeClock()
	reloaded := make(chan error, 1)
	td := startTestDaemon(t, fromArgs("-c", conf), clock.now, func(d *daemon) {
		d.notify = systemdNotify
		d.onReload = func(err error) { reloaded <- err }
	})
	if got := next(); !strings.HasPrefix(got, "READY=1\nSTATUS=answering on 127.0.0.1:") {
		t.Fatalf("first notification %q, want READY=1 and a status", got)
	}
	conn := dial(t, td.addr)
	ask := func(ip string, want []byte) {
		t.Helper()
		if got := exchange(t, conn, req(ip, alice, bob), 5*time.Second); !bytes.Equal(got, want) {
			t.Fatalf("%s: reply %x, want %x", ip, got, want)
		}
	}
	ask("198.51.100.7", []byte{1, 1})
	ask("203.0.113.5", []byte{0, 1})
	clock.advance(2 * time.Minute)
	ask("203.0.113.5", []byte{0, 2}) // too soon under 5m

	// A good file: a minimum delay of 1m, another whitelist.
	os.WriteFile(wl, []byte("192.0.2.0/24 new relays\n"), 0o644)
	writeConfig(t, dir, `min_resend_delay = "1m"`, fmt.Sprintf("whitelist = %q", wl))
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err != nil {
		t.Fatalf("reload: %v", err)
	}
	if got := next(); !regexp.MustCompile(`^RELOADING=1\nMONOTONIC_USEC=\d+\n?$`).MatchString(got) {
		t.Fatalf("notification %q, want RELOADING=1 with MONOTONIC_USEC", got)
	}
	if got := next(); got != "READY=1" {
		t.Fatalf("notification %q, want READY=1", got)
	}
	ask("192.0.2.9", []byte{1, 1})
	ask("203.0.113.5", []byte{1, 3}) // the triplet was kept; 2m now passes
	ask("198.51.100.7", []byte{0, 1})

	// A bad file: refused, the running settings stay.
	writeConfig(t, dir, `min_resend_delay = "forever"`)
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err == nil || !strings.Contains(err.Error(), `invalid duration "forever"`) {
		t.Fatalf("reload of a bad file: %v", err)
	}
	next()
	next()
	// A whitelist that fails: refused too.
	writeConfig(t, dir, `min_resend_delay = "1m"`, fmt.Sprintf("whitelist = %q", wl))
	os.WriteFile(wl, []byte("192.0.2.0/24\n300.0.0.0/8\n"), 0o644)
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err == nil || !strings.Contains(err.Error(), wl+":2:") {
		t.Fatalf("reload with a bad whitelist: %v", err)
	}
	next()
	next()
	ask("192.0.2.9", []byte{1, 1})   // the whitelist of the last good reload
	ask("203.0.113.5", []byte{1, 2}) // known since the good retry
	ask("203.0.113.6", []byte{0, 1})
	clock.advance(time.Minute)
	ask("203.0.113.6", []byte{1, 3}) // the 1m delay of the last good reload

	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	if got := next(); got != "STOPPING=1" {
		t.Fatalf("notification %q, want STOPPING=1", got)
	}
	var st Stats
	td.UpdateStats(&st)
	if st.Reloads != 1 || st.ReloadFailures != 2 {
		t.Errorf("reloads %d, failures %d; want 1 and 2", st.Reloads, st.ReloadFailures)
	}
	if log := td.errOut.String(); !strings.Contains(log, "reload failed, keeping the running settings") ||
		!strings.Contains(log, "ignoring the words after 192.0.2.0/24") {
		t.Errorf("log lacks the reload failure or the whitelist warning:\n%s", log)
	}
}

// TestReloadKeepsRestartOnlySettings checks that a reload that changes the
// state file keeps the running one and says so.
func TestReloadKeepsRestartOnlySettings(t *testing.T) {
	dir := t.TempDir()
	conf := writeConfig(t, dir)
	reloaded := make(chan error, 1)
	td := startTestDaemon(t, fromArgs("-c", conf), newFakeClock().now, func(d *daemon) {
		d.onReload = func(err error) { reloaded <- err }
	})
	os.WriteFile(conf, []byte(fmt.Sprintf("listen = \"127.0.0.1:0\"\nstate_file = %q\n", filepath.Join(dir, "other"))), 0o644)
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); err != nil {
		t.Errorf("the final save did not go to the running state file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "other")); err == nil {
		t.Error("the reload moved the state file")
	}
	if !strings.Contains(td.errOut.String(), "reload: state_file changed from") {
		t.Errorf("no warning about state_file:\n%s", td.errOut.String())
	}
}

// TestSIGUSR1Saves checks that SIGUSR1 on the signal channel saves at
// once, and says so without -d.
func TestSIGUSR1Saves(t *testing.T) {
	saved := make(chan error, 2)
	td := startTestDaemon(t, settingsOf(t, defaultConfig()), newFakeClock().now, func(d *daemon) {
		d.onSave = func(_ saveStats, err error) { saved <- err }
	})
	exchange(t, dial(t, td.addr), req("192.0.2.1", alice, bob), 5*time.Second)
	td.signals <- syscall.SIGUSR1
	select {
	case err := <-saved:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no save after SIGUSR1")
	}
	if _, err := os.Stat(td.set.StateFile); err != nil {
		t.Fatal(err)
	}
	if want := "greydaemon: saved 0 known IPs and 1 grey triplets to "; !strings.Contains(td.errOut.String(), want) {
		t.Errorf("the SIGUSR1 save was not logged (want %q):\n%s", want, td.errOut.String())
	}
}

// scrape returns the metrics text of the endpoint at addr.
func scrape(t *testing.T, addr net.Addr) string {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("scrape: %d %v", resp.StatusCode, err)
	}
	return string(body)
}

// metricValue returns the value of the sample whose name and labels are
// series, as written in the exposition format, or -1 if there is none.
func metricValue(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// TestMetricsAndAllowList scrapes the metrics endpoint before and after
// queries from allowed and refused sources, and a save.
func TestMetricsAndAllowList(t *testing.T) {
	cfg := defaultConfig()
	cfg.MetricsListen = "127.0.0.1:0"
	cfg.Allow = []string{"127.0.0.1/32"}
	saved := make(chan error, 2)
	td := startTestDaemon(t, settingsOf(t, cfg), newFakeClock().now, func(d *daemon) {
		d.saveNow = make(chan struct{})
		d.onSave = func(_ saveStats, err error) { saved <- err }
	})
	m := td.addrs["metrics"]
	before := scrape(t, m)
	for _, series := range []string{
		`greydaemon_requests_total{frontend="qmail"}`,
		`greydaemon_decisions_total{action="greylist",frontend="qmail",reason="new",reply="0001"}`,
		`greydaemon_refused_requests_total{frontend="qmail"}`,
		`greydaemon_entries{table="grey"}`,
		`greydaemon_snapshots_total`,
	} {
		if v := metricValue(before, series); v != 0 {
			t.Errorf("before any query: %s = %v, want 0", series, v)
		}
	}
	if !regexp.MustCompile(`(?m)^greydaemon_build_info\{goversion="go[^"]+",revision="[^"]+",version="[^"]+"\} 1$`).MatchString(before) {
		t.Errorf("no build info:\n%s", before)
	}

	conn := dial(t, td.addr)
	exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second)
	exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second)
	exchange(t, conn, req("192.0.2.2", alice, bob, carol), 5*time.Second)
	for range 2 {
		if got := exchange(t, conn, []byte("junk"), 200*time.Millisecond); got != nil {
			t.Fatal("junk got a reply")
		}
	}
	// 127.0.0.2 is loopback but outside the allow list.
	other, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)}, td.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if got := exchange(t, other, req("192.0.2.3", alice, bob), 300*time.Millisecond); got != nil {
		t.Fatalf("a refused source got reply %x", got)
	}
	td.saveNow <- struct{}{}
	if err := <-saved; err != nil {
		t.Fatal(err)
	}

	after := scrape(t, m)
	for series, want := range map[string]float64{
		`greydaemon_requests_total{frontend="qmail"}`:                                                   6,
		`greydaemon_replies_total{frontend="qmail"}`:                                                    3,
		`greydaemon_decisions_total{action="greylist",frontend="qmail",reason="new",reply="0001"}`:      2,
		`greydaemon_decisions_total{action="greylist",frontend="qmail",reason="too_soon",reply="0002"}`: 1,
		`greydaemon_decisions_total{action="accept",frontend="qmail",reason="known_ip",reply="0102"}`:   0,
		`greydaemon_malformed_requests_total{frontend="qmail"}`:                                         2,
		`greydaemon_refused_requests_total{frontend="qmail"}`:                                           1,
		`greydaemon_entries{table="grey"}`:                                                              3,
		`greydaemon_entries{table="known_ip"}`:                                                          0,
		`greydaemon_snapshots_total`:                                                                    1,
		`greydaemon_snapshot_failures_total`:                                                            0,
		`greydaemon_reloads_total{result="success"}`:                                                    0,
	} {
		if got := metricValue(after, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
	if v := metricValue(after, "greydaemon_snapshot_size_bytes"); v <= 0 {
		t.Errorf("snapshot size %v", v)
	}
	if v := metricValue(after, "greydaemon_snapshot_last_success_timestamp_seconds"); v < 1e9 {
		t.Errorf("last save time %v", v)
	}
}

// TestOpenListenWarning checks when the daemon warns that a front end's
// port answers anyone, for UDP and TCP front ends alike.
func TestOpenListenWarning(t *testing.T) {
	some := &IPRanges{}
	for _, tt := range []struct {
		name, addr string
		allow      *IPRanges
		want       string // "": no warning
	}{
		{"qmail", "0.0.0.0:1999", nil, "qmail: listening on 0.0.0.0:1999 with an empty allow list: anyone who can reach the port can query and fill the table"},
		{"qmail", "192.0.2.1:1999", nil, "can query and fill the table"},
		{"postfix", "tcp:[::]:10023", nil, "postfix: listening on [::]:10023 with an empty allow list: anyone who can reach the port can query and fill the table"},
		{"metrics", "tcp:0.0.0.0:9119", nil, "metrics: listening on 0.0.0.0:9119 with an empty allow list: anyone who can reach the port can read the metrics"},
		{"qmail", "0.0.0.0:1999", some, ""},
		{"postfix", "tcp:192.0.2.1:10023", some, ""},
		{"qmail", "127.0.0.1:1999", nil, ""},
		{"metrics", "tcp:127.0.0.1:9119", nil, ""},
		{"qmail", "[::1]:1999", nil, ""},
	} {
		var addr net.Addr
		if a, ok := strings.CutPrefix(tt.addr, "tcp:"); ok {
			addr, _ = net.ResolveTCPAddr("tcp", a)
		} else {
			addr, _ = net.ResolveUDPAddr("udp", tt.addr)
		}
		msg := openWarning(tt.name, addr, tt.allow)
		if tt.want == "" && msg != "" || !strings.Contains(msg, tt.want) {
			t.Errorf("%s on %s, allow %v: %q, want %q", tt.name, tt.addr, tt.allow != nil, msg, tt.want)
		}
	}
	if msg := openWarning("greylistd", &net.UnixAddr{Name: "/run/x.sock", Net: "unix"}, nil); msg != "" {
		t.Errorf("unix socket: %q", msg)
	}
}

// TestMetricsGuarded checks the metrics endpoint's guards: a connection
// from outside allow is closed unanswered, at most 16 connections are open
// at once (the 17th is closed at once, and a slot frees when one closes),
// and paths other than /metrics and / get 404.
func TestMetricsGuarded(t *testing.T) {
	cfg := defaultConfig()
	cfg.MetricsListen = "127.0.0.1:0"
	cfg.Allow = []string{"127.0.0.1/32"}
	td := startTestDaemon(t, settingsOf(t, cfg), newFakeClock().now, nil)
	m := td.addrs["metrics"].(*net.TCPAddr)
	closedAtOnce := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := c.Read(make([]byte, 1))
		return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
	}
	stranger, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).Dial("tcp", m.String())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(stranger, "GET /metrics HTTP/1.0\r\n\r\n")
	if !closedAtOnce(stranger) {
		t.Errorf("a scrape from 127.0.0.2, outside allow, was not closed unanswered")
	}
	stranger.Close()

	var idle []net.Conn
	for range 16 {
		c, err := net.Dial("tcp", m.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	time.Sleep(100 * time.Millisecond) // the server has accepted them
	extra, err := net.Dial("tcp", m.String())
	if err != nil {
		t.Fatal(err)
	}
	if !closedAtOnce(extra) {
		t.Errorf("a 17th connection was not closed at once")
	}
	extra.Close()
	idle[0].Close()
	time.Sleep(100 * time.Millisecond) // the server has seen it close
	if text := scrape(t, m); !strings.Contains(text, "greydaemon_requests_total") {
		t.Errorf("no metrics after a slot freed:\n%s", text)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + m.String() + "/other")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("/other: status %d, want 404", resp.StatusCode)
	}
}

// TestSecondInstanceRefused starts a second daemon on the same address and
// on the same state file: each is refused with an error naming the address
// or the file.
func TestSecondInstanceRefused(t *testing.T) {
	dir := t.TempDir()
	cfg := defaultConfig()
	cfg.StateFile = filepath.Join(dir, "state")
	first := startTestDaemon(t, settingsOf(t, cfg), newFakeClock().now, nil)

	// The same state file, another address.
	d := newDaemon(settingsOf(t, cfg), io.Discard, io.Discard)
	err := d.run(t.Context())
	want := fmt.Sprintf("state file %q is in use by another greydaemon (pid %d", cfg.StateFile, os.Getpid())
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("second daemon on the same state file: %v, want %q", err, want)
	}

	// The same address, another state file.
	cfg2 := defaultConfig()
	cfg2.Listen = first.addr.String()
	cfg2.StateFile = filepath.Join(dir, "state2")
	d = newDaemon(func() (*Settings, error) { return resolve(cfg2, Source{}) }, io.Discard, io.Discard)
	err = d.run(t.Context())
	want = fmt.Sprintf("cannot listen on %s: the address is in use by another process (pid %d", first.addr, os.Getpid())
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("second daemon on the same address: %v, want %q", err, want)
	}
	if _, err := os.Stat(cfg2.StateFile + ".lock"); err != nil {
		t.Errorf("lock file: %v", err)
	}

	// The first still answers, and once it stops, the file is free.
	if got := exchange(t, dial(t, first.addr), req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("first daemon: reply %x", got)
	}
	if err := first.stop(t); err != nil {
		t.Fatal(err)
	}
	startTestDaemon(t, settingsOf(t, cfg), newFakeClock().now, nil)
}

// TestRealSignals runs the daemon in a child process with main's signal
// handling: SIGHUP reloads the whitelist and the daemon keeps serving (the
// Perl daemon died of it, losing everything since its last save), SIGUSR1
// saves, SIGTERM saves and exits 0.
func TestRealSignals(t *testing.T) {
	dir := t.TempDir()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("198.51.100.0/24\n"), 0o644)
	state := filepath.Join(dir, "state")
	c := startChild(t, "-w", wl, "127.0.0.1:0", state)
	conn := dial(t, c.addr)
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("reply %x, want 0001", got)
	}
	os.WriteFile(wl, []byte("192.0.2.0/24\n"), 0o644)
	c.cmd.Process.Signal(syscall.SIGHUP)
	c.waitLog(t, "reloaded settings: 1 whitelist ranges")
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 1}) {
		t.Fatalf("after SIGHUP: reply %x, want 0101 from the new whitelist", got)
	}
	c.cmd.Process.Signal(syscall.SIGUSR1)
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(state); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("no state file after SIGUSR1: %v", err)
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, c.log.String())
	}
	if n := greyInState(t, state); n != 1 {
		t.Fatalf("%d grey triplets saved after SIGTERM, want 1", n)
	}
}

// TestSocketActivation passes a bound UDP socket to a child daemon as
// systemd does (fd 3, LISTEN_FDS=1, LISTEN_PID its own pid): the daemon
// answers on it instead of binding its configured address.
func TestSocketActivation(t *testing.T) {
	f, addr := passedSocket(t)
	c := startChildCmd(t, activatedChildCmd(f), "127.0.0.1:1", filepath.Join(t.TempDir(), "state"))
	f.Close()
	if c.addr.Port != addr.Port {
		t.Fatalf("child listens on %s, want the passed socket %s", c.addr, addr)
	}
	c.waitLog(t, "using 1 socket(s) passed by the service manager")
	if got := exchange(t, dial(t, addr), req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("reply %x, want 0001", got)
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, c.log.String())
	}
}

// TestEverySettingReloadsOrWarns walks every key of the config: each is
// either applied by a reload or kept with a warning, never silently
// ignored, and a key added later must be put in one of the two lists.
func TestEverySettingReloadsOrWarns(t *testing.T) {
	ty := reflect.TypeOf(Config{})
	for i := range ty.NumField() {
		key := ty.Field(i).Tag.Get("toml")
		if restartOnly[key] == reloadable[key] {
			t.Errorf("config key %q is in %d of restartOnly and reloadable; want exactly one", key, btoi(restartOnly[key])+btoi(reloadable[key]))
		}
	}
	if n := len(restartOnly) + len(reloadable); n != ty.NumField() {
		t.Errorf("the lists name %d keys, the config has %d", n, ty.NumField())
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestReloadAppliesAndWarns changes, by one SIGHUP, a setting of each kind
// in the config file: policy_idle_timeout, policy_defer_text and allow
// take effect (a new connection idle past the new timeout is closed; the
// defer text is the new one; a source outside the new allow list gets no
// answer), and redis_timeout and max_entries are named in a "next start"
// warning.
func TestReloadAppliesAndWarns(t *testing.T) {
	dir := t.TempDir()
	conf := writeConfig(t, dir, `policy_listen = "127.0.0.1:0"`)
	reloaded := make(chan error, 1)
	td := startTestDaemon(t, fromArgs("-c", conf), newFakeClock().now, func(d *daemon) {
		d.onReload = func(err error) { reloaded <- err }
	})
	writeConfig(t, dir, `policy_listen = "127.0.0.1:0"`, `policy_idle_timeout = "1s"`,
		`policy_defer_text = "Come back in %s seconds"`, `allow = ["127.0.0.2/32"]`,
		`redis_timeout = "1s"`, `max_entries = 5000`)
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"redis_timeout", "max_entries"} {
		if !strings.Contains(td.errOut.String(), "reload: "+key+" changed from") {
			t.Errorf("no warning for %s:\n%s", key, td.errOut.String())
		}
	}
	for _, key := range []string{"policy_idle_timeout", "policy_defer_text", "allow"} {
		if strings.Contains(td.errOut.String(), "reload: "+key) {
			t.Errorf("%s was not applied:\n%s", key, td.errOut.String())
		}
	}
	// allow: 127.0.0.1 is now outside; 127.0.0.2 is in.
	if got := exchange(t, dial(t, td.addr), req("192.0.2.1", alice, bob), 300*time.Millisecond); got != nil {
		t.Errorf("a source outside the reloaded allow list got %x", got)
	}
	pc, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).Dial("tcp", td.addrs["postfix"].String())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	fmt.Fprint(pc, policyRequestText("192.0.2.1", alice, bob))
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	reply, err := bufio.NewReader(pc).ReadString('\n')
	if err != nil || !strings.Contains(reply, "Come back in ") {
		t.Fatalf("reply %q, %v; want the reloaded defer text", reply, err)
	}
	// policy_idle_timeout: the connection is closed after a second idle.
	start := time.Now()
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.Copy(io.Discard, pc)
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("an idle connection stayed open %v with policy_idle_timeout 1s", took)
	}
}

// TestReloadResetsSaveTimer reloads a config whose save_interval drops
// from an hour to a second: saves then come every second.
func TestReloadResetsSaveTimer(t *testing.T) {
	dir := t.TempDir()
	conf := writeConfig(t, dir, `save_interval = "1h"`)
	reloaded := make(chan error, 1)
	saved := make(chan error, 10)
	td := startTestDaemon(t, fromArgs("-c", conf), newFakeClock().now, func(d *daemon) {
		d.onReload = func(err error) { reloaded <- err }
		d.onSave = func(_ saveStats, err error) { saved <- err }
	})
	writeConfig(t, dir, `save_interval = "1s"`)
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		select {
		case err := <-saved:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("save %d: none within 5 s of a reload to save_interval 1s", i+1)
		}
	}
}

// TestWhitelistWarningsOnce reloads a whitelist with a line that draws a
// warning: the warning is logged at start and not again at each reload;
// a new such line is warned about at the reload that finds it.
func TestWhitelistWarningsOnce(t *testing.T) {
	dir := t.TempDir()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("198.18.0.0/15 backup relays\n"), 0o644)
	conf := writeConfig(t, dir, fmt.Sprintf("whitelist = %q", wl))
	reloaded := make(chan error, 1)
	td := startTestDaemon(t, fromArgs("-c", conf), newFakeClock().now, func(d *daemon) {
		d.onReload = func(err error) { reloaded <- err }
	})
	reload := func() {
		t.Helper()
		td.signals <- syscall.SIGHUP
		if err := <-reloaded; err != nil {
			t.Fatal(err)
		}
	}
	reload()
	reload()
	first := wl + ":1: ignoring the words after"
	if n := strings.Count(td.errOut.String(), first); n != 1 {
		t.Errorf("the warning for line 1 was logged %d times over a start and two reloads, want once:\n%s", n, td.errOut.String())
	}
	os.WriteFile(wl, []byte("198.18.0.0/15 backup relays\n203.0.113.0/24 partner\n"), 0o644)
	reload()
	if n := strings.Count(td.errOut.String(), wl+":2: ignoring the words after"); n != 1 {
		t.Errorf("the new line's warning was logged %d times, want once:\n%s", n, td.errOut.String())
	}
	if n := strings.Count(td.errOut.String(), first); n != 1 {
		t.Errorf("line 1's warning repeated after a change elsewhere:\n%s", td.errOut.String())
	}
}

// TestRetryDelayHistogram checks greydaemon_retry_delay_seconds: a retry
// that passes six minutes after the first attempt is counted in the
// 600-second bucket and not the 300-second one, with its seconds in the
// sum; a retry too soon and a new triplet are not counted.
func TestRetryDelayHistogram(t *testing.T) {
	cfg := defaultConfig()
	cfg.MetricsListen = "127.0.0.1:0"
	clock := newFakeClock()
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
	conn := dial(t, td.addr)
	exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second)
	clock.advance(time.Minute)
	exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second) // too soon
	clock.advance(5 * time.Minute)
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 3}) {
		t.Fatalf("retry: %x", got)
	}
	text := scrape(t, td.addrs["metrics"])
	for series, want := range map[string]float64{
		`greydaemon_retry_delay_seconds_bucket{le="300"}`:  0,
		`greydaemon_retry_delay_seconds_bucket{le="600"}`:  1,
		`greydaemon_retry_delay_seconds_bucket{le="+Inf"}`: 1,
		`greydaemon_retry_delay_seconds_sum`:               360,
		`greydaemon_retry_delay_seconds_count`:             1,
	} {
		if got := metricValue(text, series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}
}
