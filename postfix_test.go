package main

import (
	"errors"
	"fmt"
	"net"
	"net/smtp"
	"net/textproto"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// This file runs the real Postfix (Debian's package) against the policy
// front end: a private instance in a temporary directory, with its own
// main.cf and master.cf, smtpd on two random ports, one asking a daemon
// over TCP and one over a unix socket. It needs root, as Postfix's master
// does; CI runs as root and installs the package.

// freeTCPPort returns a port on 127.0.0.1 that was free a moment ago.
func freeTCPPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startPostfix starts a private Postfix whose smtpd on tcpPort asks the
// policy service at inetPolicy and on unixPort the one at unixPolicy.
func startPostfix(t *testing.T, dir string, tcpPort, unixPort int, inetPolicy, unixPolicy string) {
	t.Helper()
	startPostfixWith(t, dir, fmt.Sprintf(`smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service %s
unix_restrictions = reject_unauth_destination, check_policy_service %s
`, inetPolicy, unixPolicy), map[int]string{tcpPort: "", unixPort: "-o smtpd_recipient_restrictions=$unix_restrictions"})
}

// startPostfixWith starts a private Postfix with the main.cf lines extra
// and an smtpd on each port of smtpds, with that port's -o options.
func startPostfixWith(t *testing.T, dir, extra string, smtpds map[int]string) {
	t.Helper()
	postfix := requireTool(t, "postfix", "postfix")
	conf := filepath.Join(dir, "conf")
	for _, d := range []string{conf, filepath.Join(dir, "queue"), filepath.Join(dir, "data")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	u, err := user.Lookup("postfix")
	if err != nil {
		t.Fatalf("the postfix package made no postfix user: %v", err)
	}
	var uid, gid int
	fmt.Sscan(u.Uid, &uid)
	fmt.Sscan(u.Gid, &gid)
	os.Chown(filepath.Join(dir, "data"), uid, gid)
	mainCF := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.test.example
mydomain = test.example
mydestination = rcpt.example
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Not 127.0.0.1: the test client must not be trusted, or nothing is greylisted.
mynetworks = 192.0.2.0/24
local_recipient_maps =
local_transport = discard:
default_transport = discard:
relay_transport = discard:
alias_maps =
alias_database =
biff = no
maillog_file = %[1]s/maillog
maillog_file_prefixes = %[1]s
%[2]s`, dir, extra)
	if err := os.WriteFile(filepath.Join(conf, "main.cf"), []byte(mainCF), 0o644); err != nil {
		t.Fatal(err)
	}
	// Debian's master.cf, with smtpd on our ports and nothing chrooted.
	stock, err := os.ReadFile("/etc/postfix/master.cf")
	if err != nil {
		t.Fatalf("the postfix package has no master.cf: %v", err)
	}
	var master []string
	for _, line := range strings.Split(string(stock), "\n") {
		f := strings.Fields(line)
		if len(f) >= 8 && line[0] != '#' && line[0] != ' ' && line[0] != '\t' { // a service line, not a comment or continuation
			if f[0] == "smtp" && f[1] == "inet" {
				continue
			}
			f[4] = "n" // chroot
			line = strings.Join(f, " ")
		}
		master = append(master, line)
	}
	for port, options := range smtpds {
		master = append(master, fmt.Sprintf("127.0.0.1:%d inet n - n - - smtpd %s", port, options))
	}
	if err := os.WriteFile(filepath.Join(conf, "master.cf"), []byte(strings.Join(master, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	start := exec.Command(postfix, "-c", conf, "start")
	if out, err := start.CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "maillog"))
		t.Fatalf("postfix start: %v\n%s\n%s", err, out, log)
	}
	t.Cleanup(func() { exec.Command(postfix, "-c", conf, "stop").Run() })
	for port := range smtpds {
		for i := 0; ; i++ {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
			if err == nil {
				c.Close()
				break
			}
			if i == 100 {
				log, _ := os.ReadFile(filepath.Join(dir, "maillog"))
				t.Fatalf("Postfix's smtpd does not answer on port %d: %v\n%s", port, err, log)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// smtpRcpts opens an SMTP session to port, sends MAIL FROM and one RCPT TO
// per recipient, and returns each RCPT's reply code and text.
func smtpRcpts(t *testing.T, port int, sender string, rcpts ...string) []string {
	t.Helper()
	c := smtpMail(t, port, sender)
	defer c.Close()
	var replies []string
	for _, r := range rcpts {
		replies = append(replies, smtpReply(t, c.Rcpt(r)))
	}
	c.Quit()
	return replies
}

// smtpMail opens an SMTP session to port and sends HELO and MAIL FROM.
func smtpMail(t *testing.T, port int, sender string) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Hello("client.example"); err != nil {
		c.Close()
		t.Fatal(err)
	}
	if err := c.Mail(sender); err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c
}

// smtpReply returns "250" for a command that succeeded, or the SMTP
// code and text of err; another error ends the test.
func smtpReply(t *testing.T, err error) string {
	t.Helper()
	var te *textproto.Error
	switch {
	case err == nil:
		return "250"
	case errors.As(err, &te):
		return fmt.Sprintf("%d %s", te.Code, te.Msg)
	}
	t.Fatal(err)
	return ""
}

// TestRealPostfix greylists through Postfix's smtpd over TCP and over a
// unix socket: the first attempt gets 450, a second recipient is
// greylisted on its own, and the retry after the delay gets 250.
func TestRealPostfix(t *testing.T) {
	requireRoot(t, "for Postfix's master")
	requireTool(t, "postfix", "postfix")
	dir, err := os.MkdirTemp("", "greydaemon-postfix-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755) // Postfix's daemons run as user postfix
	t.Cleanup(func() { os.RemoveAll(dir) })

	clock := newFakeClock()
	tcpDaemon := startPolicyDaemon(t, "tcp", clock, nil)
	sock := filepath.Join(dir, "policy.sock")
	cfg := defaultConfig()
	cfg.PolicyListen = "unix:" + sock
	// As the docs say: mode 0660 (the default) and Postfix's group, which
	// smtpd, running as postfix, reaches the socket through.
	cfg.PolicyGroup = "postfix"
	unixDaemon := startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
	tcpPort, unixPort := freeTCPPort(t), freeTCPPort(t)
	startPostfix(t, dir, tcpPort, unixPort, "inet:"+tcpDaemon.addrs["postfix"].String(), "unix:"+sock)

	for _, port := range []int{tcpPort, unixPort} {
		want := func(got []string, prefixes ...string) {
			t.Helper()
			for i, p := range prefixes {
				if i >= len(got) || !strings.HasPrefix(got[i], p) {
					t.Fatalf("port %d: replies %q, want %q", port, got, prefixes)
				}
			}
		}
		sender := fmt.Sprintf("alice%d@sender.example", port)
		want(smtpRcpts(t, port, sender, "bob@rcpt.example"),
			"450 4.7.1 <bob@rcpt.example>: Recipient address rejected: Greylisted, please try again in 300 seconds")
		clock.advance(2 * time.Minute)
		// The same message again, with a second recipient: each has its own clock.
		want(smtpRcpts(t, port, sender, "bob@rcpt.example", "carol@rcpt.example"),
			"450 4.7.1 <bob@rcpt.example>: Recipient address rejected: Greylisted, please try again in 180 seconds",
			"450 4.7.1 <carol@rcpt.example>: Recipient address rejected: Greylisted, please try again in 300 seconds")
		clock.advance(4 * time.Minute)
		// bob's retry passes and makes the client known; carol then passes as
		// a known client's.
		want(smtpRcpts(t, port, sender, "bob@rcpt.example", "carol@rcpt.example"), "250", "250")
		clock.advance(-6 * time.Minute) // the other daemon's clock, for the next port
	}
	for name, d := range map[string]*testDaemon{"tcp": tcpDaemon, "unix": unixDaemon} {
		var st Stats
		d.UpdateStats(&st)
		p := st.FrontEnds[1]
		if p.Verdicts[GreyNew.index()] != 2 || p.Verdicts[GreyTooSoon.index()] != 1 || p.Verdicts[AcceptRetried.index()] != 1 ||
			p.Verdicts[AcceptKnownIP.index()] != 1 {
			t.Errorf("%s daemon's verdicts %v", name, p.Verdicts)
		}
	}
}
