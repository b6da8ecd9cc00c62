package main

import (
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

// This file runs greydaemon's greylistd socket against the real Exim (in
// host-checking mode) and side by side with the real greylistd, both from
// Debian's packages.

// eximEnv names the Exim binary when it is not on the PATH: Debian allows
// one mail server package, so CI unpacks exim4-daemon-light beside the
// installed Postfix (`apt-get download`, `dpkg-deb -x`) and points this at
// its usr/sbin/exim4.
const eximEnv = "GREYDAEMON_EXIM"

// requireExim returns the Exim binary, or skips (fails under
// GREYDAEMON_REQUIRE_TOOLS) saying how to get one.
func requireExim(t *testing.T) string {
	t.Helper()
	path := os.Getenv(eximEnv)
	if path == "" {
		path, _ = exec.LookPath("exim4")
	}
	var msg string
	switch {
	case path == "":
		msg = "exim4 is not installed (apt-get install exim4-daemon-light, or unpack it and set " + eximEnv + ")"
	default:
		if _, err := user.Lookup("Debian-exim"); err != nil {
			msg = "Exim needs its Debian-exim user (useradd --system --user-group Debian-exim)"
		}
	}
	if msg != "" {
		if os.Getenv(requireToolsEnv) != "" {
			t.Fatalf("%s, and %s is set", msg, requireToolsEnv)
		}
		t.Skip(msg)
	}
	return path
}

// worldDir returns a new directory that every user may enter (Exim drops
// to Debian-exim before it runs the ACLs, and must reach the socket),
// removed when the test ends.
func worldDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "greydaemon-exim-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// eximConfig writes a private Exim configuration whose RCPT ACL holds the
// statement the docs give, contrib/exim/acl_check_rcpt as shipped (greylistd's
// own, with its socket path: only that path is changed, to sock), with what
// it names (relay_from_hosts, acl_local_deny_exceptions, a router to verify
// recipients), and returns its path.
func eximConfig(t *testing.T, dir, sock string) string {
	t.Helper()
	for _, sub := range []string{"spool", "log"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(filepath.Join(dir, sub), 0o777) // whatever the umask
	}
	statement := string(mustRead(t, "contrib/exim/acl_check_rcpt"))
	const shipped = "/run/greydaemon/greylistd.sock"
	if !strings.Contains(statement, shipped) {
		t.Fatalf("contrib/exim/acl_check_rcpt no longer asks %s", shipped)
	}
	statement = strings.ReplaceAll(statement, shipped, sock)
	conf := fmt.Sprintf(`primary_hostname = mx.test.example
domainlist local_domains = example.net
domainlist relay_to_domains =
hostlist relay_from_hosts = 127.0.0.1
spool_directory = %[1]s/spool
log_file_path = %[1]s/log/%%slog
acl_smtp_rcpt = acl_check_rcpt
begin acl
acl_local_deny_exceptions:
  accept
    hosts = 198.51.100.250
acl_check_rcpt:
%[2]s
  accept
    domains = +local_domains
  deny
    message = relay not permitted
begin routers
local:
  driver = accept
  domains = +local_domains
  transport = discard_delivery
begin transports
discard_delivery:
  driver = appendfile
  file = /dev/null
`, dir, statement)
	path := filepath.Join(dir, "exim.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// eximSession runs one SMTP dialogue through `exim -bh` from client and
// returns the replies to each RCPT TO, in order.
func eximSession(t *testing.T, exim, conf, client, from string, rcpts ...string) []string {
	t.Helper()
	var in strings.Builder
	in.WriteString("HELO client.example\r\nMAIL FROM:<" + from + ">\r\n")
	for _, r := range rcpts {
		in.WriteString("RCPT TO:<" + r + ">\r\n")
	}
	in.WriteString("QUIT\r\n")
	cmd := exec.Command(exim, "-C", conf, "-bh", client)
	cmd.Stdin = strings.NewReader(in.String())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("exim -bh: %v\n%s", err, out)
	}
	// The replies, in order: banner, HELO, MAIL, each RCPT, QUIT; the
	// lines starting ">>>" or "LOG:" are Exim's commentary.
	// A multi-line reply ("451-...", then "451 ...") is joined into one.
	var replies []string
	var pending string
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimRight(line, "\r")
		if len(line) < 4 || line[0] < '2' || line[0] > '5' || line[3] != ' ' && line[3] != '-' {
			continue
		}
		if pending == "" {
			pending = line[:3] + " "
		} else {
			pending += " "
		}
		pending += line[4:]
		if line[3] == ' ' {
			replies = append(replies, pending)
			pending = ""
		}
	}
	if len(replies) != 4+len(rcpts) {
		t.Fatalf("exim -bh gave %d replies, want %d:\n%s", len(replies), 4+len(rcpts), out)
	}
	return replies[3 : 3+len(rcpts)]
}

// TestRealExim drives Debian's Exim through its RCPT ACL, holding the
// statement the docs give (see eximConfig), with greydaemon answering on
// the greylistd socket: the first attempt is deferred (451),
// a second recipient on its own, and a retry after greylistd_retry_min is
// accepted. It also shows why the socket's permissions matter: when Exim
// cannot open it, the ACL's {false} fallback accepts the mail unchecked.
func TestRealExim(t *testing.T) {
	exim := requireExim(t)
	dir := worldDir(t)
	sock := filepath.Join(dir, "greylistd.sock")
	clock := newFakeClock()
	// Debian-exim reaches the socket through its group, as docs/exim.md
	// says to set it up (greylistd_socket_group); without root, through a
	// mode open to all.
	root := os.Geteuid() == 0
	td, _ := startListDaemon(t, clock, func(c *Config) {
		c.GreylistdListen = sock
		if root {
			c.GreylistdGroup = "Debian-exim"
		} else {
			c.GreylistdSocketMode = "0666"
		}
	})
	if root {
		grp, err := user.LookupGroup("Debian-exim")
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if gid := fi.Sys().(*syscall.Stat_t).Gid; strconv.Itoa(int(gid)) != grp.Gid || fi.Mode().Perm() != 0o660 {
			t.Fatalf("socket group %d mode %v; want Debian-exim's group (%s) and 0660", gid, fi.Mode().Perm(), grp.Gid)
		}
	}
	conf := eximConfig(t, dir, sock)

	got := eximSession(t, exim, conf, "192.0.2.33", "alice@example.org", "bob@example.net")
	if !strings.HasPrefix(got[0], "451 192.0.2.33 is not yet authorized") {
		t.Fatalf("first attempt: %q, want 451", got[0])
	}
	clock.advance(5 * time.Minute)
	got = eximSession(t, exim, conf, "192.0.2.77", "alice@example.org", "bob@example.net", "carol@example.net")
	if !strings.HasPrefix(got[0], "451 ") || !strings.HasPrefix(got[1], "451 ") {
		t.Fatalf("another address of the /24 (keyed by the exact address, as greylistd's statement sends it), with a new recipient: %q, want 451 twice", got)
	}
	clock.advance(6 * time.Minute)
	got = eximSession(t, exim, conf, "192.0.2.33", "alice@example.org", "bob@example.net", "carol@example.net")
	if got[0] != "250 Accepted" || !strings.HasPrefix(got[1], "451 ") {
		t.Fatalf("retry 11 minutes after the first attempt: %q, want 250 for bob and 451 for carol (first seen 6 minutes ago)", got)
	}

	// The socket closed to Debian-exim (root's alone, or nobody's): the
	// ACL falls back to {false} and a sender never seen is accepted.
	if root {
		if err := os.Chmod(sock, 0o600); err != nil {
			t.Fatal(err)
		}
		got = eximSession(t, exim, conf, "203.0.113.5", "spammer@example.com", "bob@example.net")
		if got[0] != "250 Accepted" {
			t.Fatalf("unreachable socket: %q; Exim's {false} fallback should accept", got[0])
		}
	}
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(td.out.String(), "greylistd update true 192.0.2.33 alice@example.org bob@example.net") {
		t.Errorf("decision log lacks the first request:\n%s", td.out.String())
	}
}

// startRealGreylistd runs Debian's greylistd privately (its socket and
// state in dir, retryMin 1 second) and returns the socket's path and a
// function that stops it with SIGTERM, which makes it save.
func startRealGreylistd(t *testing.T, dir string, saveTriplets bool) (string, func()) {
	t.Helper()
	python := requireTool(t, "python3", "python3")
	if _, err := os.Stat("/usr/sbin/greylistd"); err != nil {
		msg := "greylistd is not installed (apt-get install --no-install-recommends greylistd)"
		if os.Getenv(requireToolsEnv) != "" {
			t.Fatalf("%s, and %s is set", msg, requireToolsEnv)
		}
		t.Skip(msg)
	}
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	grp, err := user.LookupGroupId(me.Gid)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "real.sock")
	conf := filepath.Join(dir, "greylistd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`[timeouts]
retryMin = 1
retryMax = 28800
expire = 5184000
[socket]
path = %s
mode = 0660
owner = %s:%s
[data]
update = 3600
statefile = %s
tripletfile = %s
savetriplets = %t
`, sock, me.Username, grp.Name, filepath.Join(dir, "states"), filepath.Join(dir, "triplets"), saveTriplets)), 0o644)
	cmd := exec.Command(python, "/usr/sbin/greylistd", conf)
	// As its Debian unit runs it: no PYTHONHASHSEED, so Python picks a
	// new string hash seed at every start.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PYTHONHASHSEED=") && !strings.HasPrefix(kv, "LISTEN_FDS=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}
	t.Cleanup(stop)
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i == 200 {
			t.Fatalf("greylistd did not listen on %s within 10 s:\n%s", sock, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return sock, stop
}

// TestRealGreylistdOracle sends one request sequence to the real greylistd
// and to greydaemon and requires the same replies, byte for byte; then
// restarts both and shows the difference: greylistd forgets (its keys are
// Python's per-process string hashes), greydaemon does not.
func TestRealGreylistdOracle(t *testing.T) {
	dir := t.TempDir()
	real, stopReal := startRealGreylistd(t, dir, false)
	state := filepath.Join(dir, "greydaemon.state")
	edit := func(c *Config) {
		c.StateFile = state
		c.GreylistdRetryMin = Duration{time.Second}
	}
	ours := filepath.Join(dir, "ours.sock")
	td := startTestDaemon(t, settingsOf(t, listConfig(edit, ours)), time.Now, nil)

	const triplet = oracleTriplet
	ask := oracleRounds(t, real, func() string { return ours })
	if got := askSocket(t, ours, "status "+triplet, true); got != "white" {
		t.Fatalf("before the restart the triplet is %q, want white", got)
	}
	// The statistics and clearing, in greylistd's words and widths.
	ask("statistics", []string{"stats", "mrtg", "clear --grey", "stats", "status 198.51.100.8", "status " + triplet})

	// Restart both.
	stopReal()
	if err := td.stop(t); err != nil {
		t.Fatal(err)
	}
	os.Remove(real)
	real, _ = startRealGreylistd(t, dir, false)
	td = startTestDaemon(t, settingsOf(t, listConfig(edit, ours)), time.Now, nil)
	defer td.stop(t)
	realAnswer := askSocket(t, real, "--grey "+triplet, true)
	ourAnswer := askSocket(t, ours, "--grey "+triplet, true)
	t.Logf("after a restart, a triplet white before it: greylistd %q, greydaemon %q", realAnswer, ourAnswer)
	if ourAnswer != "false" {
		t.Errorf("greydaemon after a restart: %q, want false (still white)", ourAnswer)
	}
	if realAnswer != "true" {
		t.Errorf("greylistd after a restart: %q; expected true (it forgets, its keys being per-process hashes)", realAnswer)
	}
}

// oracleRounds sends oracleSequence, then, once greylistd_retry_min (1 s)
// has passed, retries of oracleTriplet, to the real greylistd at real and
// to the greydaemon socket that ours names for each request, and requires
// the same replies. It returns a function that does the same for more
// requests.
func oracleRounds(t *testing.T, real string, ours func() string) func(round string, requests []string) {
	t.Helper()
	ask := func(round string, requests []string) {
		t.Helper()
		for _, r := range requests {
			sock := ours()
			want := askSocket(t, real, r, true)
			if got := askSocket(t, sock, r, true); got != want {
				t.Errorf("%s: %q at %s: greydaemon answered %q, greylistd %q", round, r, sock, got, want)
			}
		}
	}
	ask("first round", oracleSequence)
	// retryMin is 1 second, compared in whole seconds, strictly: white
	// two whole seconds later.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(2100 * time.Millisecond)))
	ask("after retryMin", []string{
		"check --grey " + oracleTriplet,
		"update --grey " + oracleTriplet,
		"status " + oracleTriplet,
		"update " + oracleTriplet,
		"status 198.51.100.8",
	})
	return ask
}

// oracleTriplet is the data string of oracleSequence.
const oracleTriplet = "192.0.2.0/24 alice@example.org bob@example.net"

// oracleSequence is the request sequence the oracle tests send to the real
// greylistd and to greydaemon: every command, bad options, empty requests,
// case and white space.
var oracleSequence = []string{
	"--grey " + oracleTriplet,
	"check " + oracleTriplet,
	"status " + oracleTriplet,
	"update --white " + oracleTriplet,
	"STATUS  192.0.2.0/24\tALICE@example.org   bob@EXAMPLE.net\n",
	"add --black 198.51.100.7",
	"check 198.51.100.7",
	"check --white 198.51.100.7",
	"update 198.51.100.7",
	"delete 198.51.100.7",
	"delete 198.51.100.7",
	"status 198.51.100.7",
	"add --purple 198.51.100.7",
	"add 198.51.100.8",
	"add --grey 198.51.100.8",
	"update --bogus " + oracleTriplet,
	"",
	"   ",
	"check",
	"--grey",
	"stats extra",
	"list",
	"updates are words " + oracleTriplet,
	"-x -y " + oracleTriplet,
	"clear --purple",
}

// TestRealGreylistdOracleRedis sends the oracle sequence to the real
// greylistd and, alternately, to two greydaemons deciding in one Redis (as
// two MX hosts of an Exim site): every reply is greylistd's, byte for
// byte, so an entry one daemon made is the other's, and after retryMin an
// update at one turns white a triplet first seen at the other.
func TestRealGreylistdOracleRedis(t *testing.T) {
	port, _ := startRedis(t, 0)
	dir := t.TempDir()
	real, _ := startRealGreylistd(t, dir, false)
	var socks [2]string
	for i := range socks {
		socks[i] = filepath.Join(dir, fmt.Sprintf("ours%d.sock", i))
		td := startTestDaemon(t, settingsOf(t, listConfig(func(c *Config) {
			c.GreylistdRetryMin = Duration{time.Second}
			c.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", port)
		}, socks[i])), time.Now, nil)
		waitRedisConnected(t, td)
	}
	n := 0
	oracleRounds(t, real, func() string { n++; return socks[n%2] })
	if keys := redisDo(t, port, "KEYS", "greydaemon:l:*"); keys == "*0" {
		t.Errorf("no greylistd entry in Redis")
	}
}

// listConfig returns the default configuration with the greylistd socket
// at sock, edited by edit.
func listConfig(edit func(*Config), sock string) Config {
	c := defaultConfig()
	c.GreylistdListen = sock
	edit(&c)
	return c
}

// TestRealGreylistdMigration moves a real greylistd's entries to greydaemon
// with import-greylistd, as docs/exim.md says: stop greylistd (it
// saves), import its files, start greydaemon.
func TestRealGreylistdMigration(t *testing.T) {
	dir := t.TempDir()
	real, stopReal := startRealGreylistd(t, dir, true)
	const white, grey, black = "192.0.2.0/24 alice@example.org bob@example.net", "198.51.100.0/24 x@example.com y@example.net", "spammer.example"
	askSocket(t, real, "update "+white, true)
	askSocket(t, real, "update "+grey, true)
	askSocket(t, real, "add --black "+black, true)
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(2100 * time.Millisecond)))
	if got := askSocket(t, real, "update "+white, true); got != "white" {
		t.Fatalf("greylistd: the retry answered %q", got)
	}
	stopReal()

	state := filepath.Join(dir, "greydaemon.state")
	conf := writeTemp(t, "g.toml", "state_file = \""+state+"\"\ngreylistd_retry_min = \"1s\"\n")
	var out strings.Builder
	if err := importGreylistdCommand([]string{"-c", conf, filepath.Join(dir, "states"), filepath.Join(dir, "triplets")}, &out, time.Now); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", out.String())
	if !strings.HasPrefix(out.String(), "imported 3 greylistd entries") {
		t.Fatalf("import: %s", out.String())
	}
	ours := filepath.Join(dir, "ours.sock")
	td := startTestDaemon(t, settingsOf(t, listConfig(func(c *Config) { c.StateFile = state }, ours)), time.Now, nil)
	defer td.stop(t)
	for _, tc := range [][2]string{{white, "white"}, {grey, "grey"}, {black, "black"}} {
		if got := askSocket(t, ours, "status "+tc[0], true); got != tc[1] {
			t.Errorf("after the migration, %q is %q, want %q", tc[0], got, tc[1])
		}
	}
}
