package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// This file runs the real MTAs against the milter front end: Debian's
// Postfix (smtpd_milters, over TCP and over a unix socket) and Debian's
// Sendmail (INPUT_MAIL_FILTER, unpacked beside Postfix as its package
// conflicts with it). Each gets the same three checks: the first RCPT is
// deferred, the retry after the minimum delay is accepted and its queued
// message carries the X-Greylist header, and the qmail front end then
// answers the client as known.

// smtpMessage sends one message over SMTP to port from sender to rcpts
// and returns each RCPT's reply ("250" or the code and text) and DATA's
// ("250", or the code and text; "" when no recipient was accepted).
func smtpMessage(t *testing.T, port int, sender string, rcpts ...string) (rcptReplies []string, data string) {
	t.Helper()
	c := smtpMail(t, port, sender)
	defer c.Close()
	accepted := 0
	for _, r := range rcpts {
		got := smtpReply(t, c.Rcpt(r))
		rcptReplies = append(rcptReplies, got)
		if got == "250" {
			accepted++
		}
	}
	if accepted == 0 {
		c.Quit()
		return rcptReplies, ""
	}
	w, err := c.Data()
	if err != nil {
		return rcptReplies, smtpReply(t, err)
	}
	fmt.Fprintf(w, "From: %s\r\nTo: %s\r\nSubject: greylisting test\r\n\r\nHello.\r\n", sender, rcpts[0])
	data = smtpReply(t, w.Close())
	c.Quit()
	return rcptReplies, data
}

// milterMTAChecks runs the three checks against an MTA on port whose
// milter is td's, whose clock is clock; queued returns the text of each
// message the MTA has queued.
func milterMTAChecks(t *testing.T, td *testDaemon, clock *fakeClock, port int, queued func() []string) {
	t.Helper()
	sender := fmt.Sprintf("alice%d@sender.example", port)
	rcpts, _ := smtpMessage(t, port, sender, "bob@rcpt.example")
	if want := "451 4.7.1 Greylisted, please try again in 300 seconds"; len(rcpts) != 1 || rcpts[0] != want {
		t.Fatalf("first attempt: RCPT got %q, want %q", rcpts, want)
	}
	clock.advance(5*time.Minute + 2*time.Second)
	rcpts, data := smtpMessage(t, port, sender, "bob@rcpt.example")
	if len(rcpts) != 1 || rcpts[0] != "250" || !strings.HasPrefix(data, "250") {
		t.Fatalf("retry after the minimum delay: RCPT got %q, DATA %q, want 250 and 250", rcpts, data)
	}
	text := ""
	for i := 0; i < 100 && text == ""; i++ {
		for _, m := range queued() {
			if strings.Contains(m, "From: "+sender) {
				text = m
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(text, "\nX-Greylist: delayed 302 seconds by greydaemon") {
		t.Errorf("queued message lacks the X-Greylist header:\n%s", text)
	}
	if got := qmailAsk(t, td.addr, req("127.0.0.1", sender, "carol@rcpt.example")); got != "\x01\x02" {
		t.Errorf("qmail query for the client afterwards: %q, want known (0102)", got)
	}
}

// TestRealPostfixMilter runs Postfix's smtpd with smtpd_milters over TCP
// and over a unix socket in Postfix's group, holding every message it
// accepts so that its headers can be read.
func TestRealPostfixMilter(t *testing.T) {
	requireRoot(t, "for Postfix's master")
	requireTool(t, "postfix", "postfix")
	postcat := requireTool(t, "postcat", "postfix")
	dir, err := os.MkdirTemp("", "greydaemon-postfix-milter-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755) // Postfix's daemons run as user postfix
	t.Cleanup(func() { os.RemoveAll(dir) })

	tcpClock, unixClock := newFakeClock(), newFakeClock()
	tcpDaemon := startMilterDaemon(t, "tcp", tcpClock, "")
	sock := filepath.Join(dir, "milter.sock")
	unixConf := writeTemp(t, "unix.toml", fmt.Sprintf("milter_listen = %q\nmilter_socket_group = \"postfix\"\n", "unix:"+sock))
	unixDaemon := startTestDaemon(t, settingsFromFile(t, unixConf), unixClock.now, nil)
	tcpPort, unixPort := freeTCPPort(t), freeTCPPort(t)
	// As the docs recommend: tempfail when greydaemon cannot answer.
	startPostfixWith(t, dir, `smtpd_recipient_restrictions = reject_unauth_destination
smtpd_data_restrictions = check_client_access static:HOLD
milter_default_action = tempfail
`, map[int]string{
		tcpPort:  "-o smtpd_milters=inet:" + tcpDaemon.addrs["milter"].String(),
		unixPort: "-o smtpd_milters=unix:" + sock,
	})
	queued := func() []string {
		var all []string
		files, _ := filepath.Glob(filepath.Join(dir, "queue", "hold", "*"))
		for _, f := range files {
			out, _ := exec.Command(postcat, "-c", filepath.Join(dir, "conf"), f).CombinedOutput()
			all = append(all, string(out))
		}
		return all
	}
	t.Run("tcp", func(t *testing.T) { milterMTAChecks(t, tcpDaemon, tcpClock, tcpPort, queued) })
	t.Run("unix", func(t *testing.T) { milterMTAChecks(t, unixDaemon, unixClock, unixPort, queued) })
}

// sendmailEnv names the directory Debian's sendmail-bin and sendmail-cf
// packages are unpacked in (.ci/run unpacks them beside Postfix, whose
// package conflicts with them); without it, an installed Sendmail is used.
const sendmailEnv = "GREYDAEMON_SENDMAIL"

// findSendmail returns the root that Sendmail's binary and its cf files
// are under, or skips the test (fails it under GREYDAEMON_REQUIRE_TOOLS)
// when there is none.
func findSendmail(t *testing.T) string {
	t.Helper()
	roots := []string{"/"}
	if dir := os.Getenv(sendmailEnv); dir != "" {
		roots = []string{dir}
	}
	for _, root := range roots {
		if _, err := os.Stat(filepath.Join(root, "usr/libexec/sendmail/sendmail")); err == nil {
			return root
		}
	}
	msg := fmt.Sprintf("Sendmail is not installed (apt-get download sendmail-bin sendmail-cf and dpkg-deb -x them into a directory named by %s, as .ci/run does)", sendmailEnv)
	if os.Getenv(requireToolsEnv) != "" {
		t.Fatalf("%s, and %s is set", msg, requireToolsEnv)
	}
	t.Skip(msg)
	return ""
}

// sendmailMC is the private Sendmail configuration, for sendmail-cf's m4:
// a daemon on 127.0.0.1 that queues what it accepts without delivering
// it, relays anything (the test's recipients are nowhere), and asks
// greydaemon's milter with the lines of contrib/sendmail/greydaemon.mc.
const sendmailMC = `divert(-1)
divert(0)dnl
OSTYPE(` + "`linux'" + `)dnl
define(` + "`confDOMAIN_NAME', `mx.test.example'" + `)dnl
define(` + "`QUEUE_DIR', `%[1]s/mqueue'" + `)dnl
define(` + "`confPID_FILE', `%[1]s/sendmail.pid'" + `)dnl
define(` + "`STATUS_FILE', `%[1]s/statistics'" + `)dnl
define(` + "`ALIAS_FILE', `'" + `)dnl
define(` + "`confHOST_STATUS_DIRECTORY', `'" + `)dnl
define(` + "`confDELIVERY_MODE', `queueonly'" + `)dnl
define(` + "`confDONT_PROBE_INTERFACES', `True'" + `)dnl
FEATURE(` + "`nocanonify'" + `)dnl
FEATURE(` + "`accept_unresolvable_domains'" + `)dnl
FEATURE(` + "`promiscuous_relay'" + `)dnl
DAEMON_OPTIONS(` + "`Port=%[2]d, Addr=127.0.0.1, Name=MTA'" + `)dnl
%[3]s
MAILER(` + "`smtp'" + `)dnl
`

// TestRealSendmail runs Debian's Sendmail 8.17 as a private daemon (-bD)
// on a free port, its sendmail.cf built from sendmail-cf's m4 with
// greydaemon's INPUT_MAIL_FILTER, and reads the X-Greylist header from the
// queue file of the message it accepted. Sendmail sleeps a minute at start
// when the host name is not qualified, so it runs in a UTS namespace of
// its own named mx.test.example.
func TestRealSendmail(t *testing.T) {
	requireRoot(t, "for Sendmail's daemon and its UTS namespace")
	root := findSendmail(t)
	m4 := requireTool(t, "m4", "m4")
	unshare := requireTool(t, "unshare", "util-linux")
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "mqueue"), 0o700)
	clock := newFakeClock()
	td := startMilterDaemon(t, "tcp", clock, "")
	port := freeTCPPort(t)
	// The shipped lines, with the daemon's port for 8891.
	shipped, err := os.ReadFile("contrib/sendmail/greydaemon.mc")
	if err != nil || !strings.Contains(string(shipped), "S=inet:8891@127.0.0.1, F=T") {
		t.Fatalf("contrib/sendmail/greydaemon.mc: %v; want its INPUT_MAIL_FILTER on inet:8891@127.0.0.1 with F=T", err)
	}
	filter := strings.ReplaceAll(string(shipped), "inet:8891@", fmt.Sprintf("inet:%d@", td.addrs["milter"].(*net.TCPAddr).Port))
	mc := fmt.Sprintf(sendmailMC, dir, port, filter)
	cfDir := filepath.Join(root, "usr/share/sendmail/cf") + "/"
	cf, err := exec.Command(m4, "-D_CF_DIR_="+cfDir, cfDir+"m4/cf.m4", writeTemp(t, "sendmail.mc", mc)).Output()
	if err != nil {
		t.Fatalf("m4 sendmail.mc: %v", err)
	}
	cfPath := filepath.Join(dir, "sendmail.cf")
	os.WriteFile(cfPath, cf, 0o644)
	var out syncBuffer
	cmd := exec.Command(unshare, "--uts", "sh", "-c", `hostname mx.test.example && exec "$0" -C "$1" -bD`,
		filepath.Join(root, "usr/libexec/sendmail/sendmail"), cfPath)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			break
		}
		if i == 150 {
			t.Fatalf("Sendmail does not answer on port %d within 15 s: %v\n%s", port, err, out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	queued := func() []string {
		var all []string
		files, _ := filepath.Glob(filepath.Join(dir, "mqueue", "qf*"))
		for _, f := range files {
			text, _ := os.ReadFile(f)
			all = append(all, strings.ReplaceAll(string(text), "\nH??", "\n")) // header lines
		}
		return all
	}
	milterMTAChecks(t, td, clock, port, queued)
}
