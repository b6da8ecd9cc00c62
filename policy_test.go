package main

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// policyRequestText returns a Postfix policy request for one recipient at
// protocol state RCPT, as smtpd sends it.
func policyRequestText(client, sender, rcpt string) string {
	return "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n" +
		"client_address=" + client + "\nclient_name=mail.example\nreverse_client_name=mail.example\n" +
		"helo_name=mail.example\nsender=" + sender + "\nrecipient=" + rcpt + "\nrecipient_count=0\n" +
		"queue_id=\ninstance=123.456.789.0\nsize=0\netrn_domain=\nstress=\nsasl_method=\n" +
		"ccert_subject=\nccert_issuer=\nccert_fingerprint=\nencryption_protocol=\nencryption_cipher=\n" +
		"encryption_keysize=0\n\n"
}

// policyClient talks to a policy server as Postfix does.
type policyClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialPolicy(t *testing.T, addr net.Addr) *policyClient {
	t.Helper()
	conn, err := net.Dial(addr.Network(), addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	return &policyClient{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// send writes raw request text.
func (c *policyClient) send(text string) {
	c.t.Helper()
	if _, err := io.WriteString(c.conn, text); err != nil {
		c.t.Fatal(err)
	}
}

// reply reads one reply: its action line, without "action=".
func (c *policyClient) reply() string {
	c.t.Helper()
	line, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("no reply: %v", err)
	}
	if blank, err := c.r.ReadString('\n'); err != nil || blank != "\n" {
		c.t.Fatalf("reply %q not ended by an empty line (%q, %v)", line, blank, err)
	}
	action, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "action=")
	if !ok {
		c.t.Fatalf("reply %q has no action", line)
	}
	return action
}

// ask sends one request and returns the action.
func (c *policyClient) ask(client, sender, rcpt string) string {
	c.t.Helper()
	c.send(policyRequestText(client, sender, rcpt))
	return c.reply()
}

// startPolicyDaemon runs a daemon with a policy listener on spec ("tcp" for
// 127.0.0.1:0, or "unix" for a socket in a temporary directory).
func startPolicyDaemon(t *testing.T, spec string, clock *fakeClock, edit func(*Config)) *testDaemon {
	t.Helper()
	cfg := defaultConfig()
	cfg.PolicyListen = "127.0.0.1:0"
	if spec == "unix" {
		cfg.PolicyListen = "unix:" + filepath.Join(t.TempDir(), "policy.sock")
	}
	if edit != nil {
		edit(&cfg)
	}
	return startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
}

// TestPolicyRoundTrips asks every kind of question over TCP and over a
// unix socket, pipelined and not, and checks each answer form.
func TestPolicyRoundTrips(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			clock := newFakeClock()
			td := startPolicyDaemon(t, network, clock, func(c *Config) {
				c.Whitelist = writeTemp(t, "whitelist", "198.51.100.0/24\n")
			})
			c := dialPolicy(t, td.addrs["postfix"])
			if got := c.ask("192.0.2.1", alice, bob); got != "DEFER_IF_PERMIT Greylisted, please try again in 300 seconds" {
				t.Fatalf("first attempt: %q", got)
			}
			clock.advance(2 * time.Minute)
			if got := c.ask("192.0.2.1", alice, bob); got != "DEFER_IF_PERMIT Greylisted, please try again in 180 seconds" {
				t.Fatalf("too soon: %q", got)
			}
			// A second recipient of the same message is greylisted on its own.
			if got := c.ask("192.0.2.1", alice, carol); !strings.HasPrefix(got, "DEFER_IF_PERMIT") {
				t.Fatalf("second recipient: %q", got)
			}
			clock.advance(4 * time.Minute)
			if got := c.ask("192.0.2.1", alice, bob); got != "PREPEND X-Greylist: delayed 360 seconds by greydaemon" {
				t.Fatalf("good retry: %q", got)
			}
			// The client is known now: everything passes, untouched.
			if got := c.ask("192.0.2.1", "other@sender.example", "x@rcpt.example"); got != "DUNNO" {
				t.Fatalf("known client: %q", got)
			}
			if got := c.ask("198.51.100.9", alice, bob); got != "DUNNO" {
				t.Fatalf("whitelisted client: %q", got)
			}
			if got := c.ask("192.0.2.50", "", verp); got != "DUNNO" {
				t.Fatalf("bounce to a VERP address: %q", got)
			}
			// Pipelined: three requests in one write, three replies in order.
			c.send(policyRequestText("192.0.2.60", alice, bob) + policyRequestText("192.0.2.1", alice, bob) +
				policyRequestText("192.0.2.60", alice, bob))
			for i, want := range []string{"DEFER_IF_PERMIT", "DUNNO", "DEFER_IF_PERMIT"} {
				if got := c.reply(); !strings.HasPrefix(got, want) {
					t.Fatalf("pipelined reply %d: %q, want %s", i, got, want)
				}
			}
			// Another protocol state, or a missing attribute: DUNNO.
			c.send(strings.Replace(policyRequestText("192.0.2.70", alice, bob), "protocol_state=RCPT", "protocol_state=MAIL", 1))
			if got := c.reply(); got != "DUNNO" {
				t.Fatalf("MAIL state: %q", got)
			}
			c.send("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.71\n\n")
			if got := c.reply(); got != "DUNNO" {
				t.Fatalf("no sender or recipient: %q", got)
			}
			td.stop(t)
			log := td.out.String()
			for _, want := range []string{
				`(?m)^postfix ` + peerPattern(network) + ` new grey I192\.0\.2\.1 F` + alice + ` T` + bob + `$`,
				`(?m)^postfix ` + peerPattern(network) + ` retry ok I192\.0\.2\.1 F` + alice + ` T` + bob + `$`,
				`(?m) bad req not at RCPT I192\.0\.2\.70 F`,
				`(?m) bad req missing attributes I192\.0\.2\.71 F T$`,
			} {
				if !regexp.MustCompile(want).MatchString(log) {
					t.Errorf("decision log lacks %s:\n%s", want, log)
				}
			}
			var st Stats
			td.UpdateStats(&st)
			p := st.FrontEnds[1]
			if p.Name != "postfix" || p.Requests != 12 || p.Replies != 12 || p.Malformed != 2 ||
				p.Verdicts[GreyNew.index()] != 3 || p.Verdicts[AcceptRetried.index()] != 1 {
				t.Errorf("policy stats %+v", p)
			}
		})
	}
}

// peerPattern matches how the decision log names a peer on network.
func peerPattern(network string) string {
	if network == "unix" {
		return "unix"
	}
	return `127\.0\.0\.1:\d+`
}

// writeTemp writes text to a new file named name and returns its path.
func writeTemp(t *testing.T, name, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestPolicyAndQmailShareState greylists a triplet over qmail's UDP and
// lets its retry through over the policy protocol, and the other way round.
func TestPolicyAndQmailShareState(t *testing.T) {
	clock := newFakeClock()
	td := startPolicyDaemon(t, "tcp", clock, nil)
	udp := dial(t, td.addr)
	pc := dialPolicy(t, td.addrs["postfix"])
	if got := exchange(t, udp, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("qmail first attempt: %x", got)
	}
	if got := pc.ask("192.0.2.2", alice, bob); !strings.HasPrefix(got, "DEFER_IF_PERMIT") {
		t.Fatalf("policy first attempt: %q", got)
	}
	clock.advance(6 * time.Minute)
	if got := pc.ask("192.0.2.1", alice, bob); got != "PREPEND X-Greylist: delayed 360 seconds by greydaemon" {
		t.Fatalf("policy retry of the qmail attempt: %q", got)
	}
	if got := exchange(t, udp, req("192.0.2.2", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 3}) {
		t.Fatalf("qmail retry of the policy attempt: %x", got)
	}
	if got := exchange(t, udp, req("192.0.2.1", "x@y", "z@w"), 5*time.Second); !bytes.Equal(got, []byte{1, 2}) {
		t.Fatalf("qmail after the policy retry made the client known: %x", got)
	}
}

// TestPolicyMisbehavingClients sends an over-long line, an over-large
// request and nothing at all (past the idle timeout): each connection is
// closed, and a well-behaved client beside them is answered.
func TestPolicyMisbehavingClients(t *testing.T) {
	clock := newFakeClock()
	td := startPolicyDaemon(t, "tcp", clock, func(c *Config) {
		c.PolicyIdleTimeout = Duration{2 * time.Second}
		c.PolicyPrependHeader = false
		c.PolicyDeferText = "Try again in %s s (%r, 100%%)"
	})
	addr := td.addrs["postfix"]
	closed := func(c *policyClient, what string) {
		t.Helper()
		c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.r.ReadByte(); err == nil || isTimeout(err) {
			t.Errorf("%s: connection not closed (%v)", what, err)
		}
	}
	good := dialPolicy(t, addr)
	slow := dialPolicy(t, addr)
	slow.send("request=smtpd_access_policy\n") // and then nothing
	long := dialPolicy(t, addr)
	long.send("recipient=" + strings.Repeat("x", policyMaxLine) + "\n")
	large := dialPolicy(t, addr)
	// The server closes the connection once the request is too large, so
	// the rest of the sending may fail: a reset is the expected end.
	large.conn.Write([]byte(strings.Repeat("x_attribute="+strings.Repeat("y", 1000)+"\n", policyMaxRequest/1000+2)))
	if got := good.ask("192.0.2.1", alice, "bob@rcpt.example"); got != "DEFER_IF_PERMIT Try again in 300 s (rcpt.example, 100%)" {
		t.Fatalf("well-behaved client: %q", got)
	}
	closed(long, "over-long line")
	closed(large, "over-large request")
	closed(slow, "idle client")
	clock.advance(6 * time.Minute)
	again := dialPolicy(t, addr) // the first is past its idle timeout too
	if got := again.ask("192.0.2.1", alice, "bob@rcpt.example"); got != "DUNNO" {
		t.Fatalf("retry with the header turned off: %q", got)
	}
	var st Stats
	td.UpdateStats(&st)
	if p := st.FrontEnds[1]; p.Malformed < 2 {
		t.Errorf("malformed %d, want the long line and the large request counted", p.Malformed)
	}
}

// TestPolicyConnectionCapAndAllow checks the connection cap and the allow
// list on the policy listener.
func TestPolicyConnectionCapAndAllow(t *testing.T) {
	td := startPolicyDaemon(t, "tcp", newFakeClock(), func(c *Config) { c.PolicyMaxConnections = 2 })
	addr := td.addrs["postfix"]
	a, b := dialPolicy(t, addr), dialPolicy(t, addr)
	a.ask("192.0.2.1", alice, bob)
	b.ask("192.0.2.2", alice, bob)
	third := dialPolicy(t, addr)
	third.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	third.conn.Write([]byte(policyRequestText("192.0.2.3", alice, bob)))
	if _, err := third.r.ReadByte(); err == nil || isTimeout(err) {
		t.Errorf("a third connection past a cap of 2 was not closed at once: %v", err)
	}
	a.ask("192.0.2.1", alice, carol) // the first two still work
	// A finished connection frees its place: after a closes, a new one is
	// served (once the server has seen the close).
	a.conn.Close()
	served := false
	for i := 0; i < 50 && !served; i++ {
		c := dialPolicy(t, addr)
		c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		c.conn.Write([]byte(policyRequestText("192.0.2.4", alice, bob)))
		if line, err := c.r.ReadString('\n'); err == nil && strings.HasPrefix(line, "action=") {
			served = true
		} else {
			time.Sleep(20 * time.Millisecond)
		}
		c.conn.Close()
	}
	if !served {
		t.Error("no connection was served after one of the two closed")
	}

	td2 := startPolicyDaemon(t, "tcp", newFakeClock(), func(c *Config) { c.Allow = []string{"10.0.0.0/8"} })
	refused := dialPolicy(t, td2.addrs["postfix"])
	refused.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	refused.conn.Write([]byte(policyRequestText("192.0.2.1", alice, bob)))
	if _, err := refused.r.ReadByte(); err == nil || isTimeout(err) {
		t.Errorf("a client outside the allow list was not closed at once: %v", err)
	}
	var st Stats
	td2.UpdateStats(&st)
	if st.FrontEnds[1].Refused != 1 {
		t.Errorf("refused %d, want 1", st.FrontEnds[1].Refused)
	}
}

// TestPolicyAllocatesNothing counts the process's heap allocations over
// thousands of policy requests on open connections: there must be none.
func TestPolicyAllocatesNothing(t *testing.T) {
	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.PolicyListen = "127.0.0.1:0"
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, func(d *daemon) { d.stdout = discard{} })
	var clients []*policyClient
	for range 4 {
		clients = append(clients, dialPolicy(t, td.addrs["postfix"]))
	}
	known := []byte(policyRequestText("192.0.2.1", alice, bob))
	grey := []byte(policyRequestText("192.0.2.2", alice, bob))
	buf := make([]byte, 256)
	roundTrip := func(c *policyClient, d []byte) {
		if _, err := c.conn.Write(d); err != nil {
			t.Fatal(err)
		}
		// Read until the empty line that ends the reply.
		n := 0
		for n < 2 || buf[n-1] != '\n' || buf[n-2] != '\n' {
			m, err := c.conn.Read(buf[n:])
			if err != nil {
				t.Fatal(err)
			}
			n += m
		}
	}
	roundTrip(clients[0], known)
	clock.advance(6 * time.Minute)
	// Warm up long enough that the Go runtime has made the threads and
	// wait-queue entries the connections' goroutines need.
	for range 200 {
		for _, c := range clients {
			roundTrip(c, known)
			roundTrip(c, grey)
		}
	}
	const rounds = 500
	requireNoAllocations(t, rounds*len(clients)*2, func() {
		for range rounds {
			for _, c := range clients {
				roundTrip(c, known)
				roundTrip(c, grey)
			}
		}
	})
}

// FuzzPolicyConnection feeds arbitrary bytes to a policy connection: no
// panic, and whatever comes back is a sequence of well-formed replies.
func FuzzPolicyConnection(f *testing.F) {
	f.Add([]byte(policyRequestText("192.0.2.1", alice, bob)))
	f.Add([]byte(policyRequestText("2001:db8::1", "", verp) + "\n\n" + policyRequestText("x", "a b", "c\r")))
	f.Add([]byte("request=smtpd_access_policy\r\nprotocol_state=DATA\r\nrecipient=\r\n\r\n"))
	f.Fuzz(func(t *testing.T, input []byte) {
		g, _ := newTestGreylister(t, "")
		p := &policyServer{g: g, log: newLogger(io.Discard, false), dlog: newDecisionLog(io.Discard), conns: newConnSet(1)}
		p.idle.Store(int64(time.Minute))
		text, _ := parseDeferText(defaultDeferText)
		p.replies.Store(&policyReplies{deferText: text, prepend: true})
		server, client := socketPair(t)
		done := make(chan struct{})
		go func() {
			p.serveConn(server, &p.stripes[0], 0)
			server.Close()
			close(done)
		}()
		go func() {
			client.Write(input)
			client.CloseWrite()
		}()
		out, _ := io.ReadAll(client)
		<-done
		for len(out) > 0 {
			line, rest, ok := bytes.Cut(out, []byte("\n\n"))
			if !ok || !bytes.HasPrefix(line, []byte("action=")) || bytes.IndexByte(line, '\n') >= 0 {
				t.Fatalf("malformed reply %q", out)
			}
			out = rest
		}
	})
}

// socketPair returns the two ends of a connected unix stream socket pair.
func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var ends [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ends[i] = c.(*net.UnixConn)
		t.Cleanup(func() { ends[i].Close() })
	}
	return ends[0], ends[1]
}
