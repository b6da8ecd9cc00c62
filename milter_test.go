package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/d--j/go-milter"
)

// startMilterDaemon runs a daemon with a milter listener on spec ("tcp"
// for 127.0.0.1:0, or "unix" for a socket in a temporary directory) and
// the extra config file lines extra.
func startMilterDaemon(t *testing.T, spec string, clock *fakeClock, extra string) *testDaemon {
	t.Helper()
	listen := "127.0.0.1:0"
	if spec == "unix" {
		listen = "unix:" + filepath.Join(t.TempDir(), "milter.sock")
	}
	conf := writeTemp(t, "greydaemon.toml", fmt.Sprintf("milter_listen = %q\n%s", listen, extra))
	return startTestDaemon(t, settingsFromFile(t, conf), clock.now, nil)
}

// settingsFromFile returns a load function for the config file path, as
// a user writes it, on 127.0.0.1:0 with a state file in a temporary
// directory.
func settingsFromFile(t testing.TB, path string) func() (*Settings, error) {
	t.Helper()
	state := filepath.Join(t.TempDir(), "state")
	return func() (*Settings, error) {
		return parseCommandLine([]string{"-c", path, "127.0.0.1:0", state})
	}
}

// milterAddr returns the network and address of a daemon's milter front end.
func milterAddr(td *testDaemon) (string, string) {
	a := td.addrs["milter"]
	return a.Network(), a.String()
}

// A milterMessage is what one message's conversation got: each
// recipient's reply ("continue", or the SMTP reply), DATA's, and the
// headers added at the end.
type milterMessage struct {
	rcpts   []string
	data    string
	headers []string
}

// milterSend runs one conversation with the daemon's milter, as an MTA
// does for one SMTP session with one message from the client address ip
// (or none if empty), with the macros given at MAIL.
func milterSend(t *testing.T, td *testDaemon, ip, sender string, macros map[string]string, rcpts ...string) milterMessage {
	t.Helper()
	network, addr := milterAddr(td)
	bag := milter.NewMacroBag()
	for k, v := range macros {
		bag.Set(k, v)
	}
	client := milter.NewClient(network, addr, milter.WithActions(milter.OptAddHeader))
	s, err := client.Session(bag)
	if err != nil {
		t.Fatalf("milter session: %v", err)
	}
	defer s.Close()
	family := milter.FamilyInet
	if ip == "" {
		family = milter.FamilyUnknown
	} else if strings.Contains(ip, ":") {
		family = milter.FamilyInet6
	}
	var got milterMessage
	step := func(what string) func(*milter.Action, error) string {
		return func(act *milter.Action, err error) string {
			t.Helper()
			if err != nil {
				t.Fatalf("milter %s: %v", what, err)
			}
			if act.StopProcessing() {
				return act.SMTPReply
			}
			return "continue"
		}
	}
	step("connect")(s.Conn("client.example", family, 4025, ip))
	step("helo")(s.Helo("client.example"))
	step("mail")(s.Mail(sender, ""))
	passed := 0
	for _, r := range rcpts {
		reply := step("rcpt")(s.Rcpt(r, ""))
		got.rcpts = append(got.rcpts, reply)
		if reply == "continue" {
			passed++
		}
	}
	if passed == 0 {
		return got
	}
	if got.data = step("data")(s.DataStart()); got.data != "continue" {
		return got
	}
	step("end of headers")(s.HeaderEnd())
	step("body")(s.BodyChunk([]byte("Hello.\r\n")))
	mods, act, err := s.End()
	if err != nil || act.Type != milter.ActionAccept {
		t.Fatalf("milter end of message: %v %v", act, err)
	}
	for _, m := range mods {
		if m.Type == milter.ActionAddHeader {
			got.headers = append(got.headers, m.HeaderName+": "+m.HeaderValue)
		}
	}
	return got
}

// TestMilterRoundTrips greylists through the milter over TCP and a unix
// socket: the first attempt is deferred with 451 4.7.1 and the seconds
// left, each recipient has its own clock, the retry passes and adds the
// X-Greylist header with the delay, and the client is then known to the
// qmail front end too. Authenticated and addressless clients pass
// unchecked; whitelisted ones pass without an entry.
func TestMilterRoundTrips(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			clock := newFakeClock()
			wl := writeTemp(t, "whitelist", "198.51.100.0/24\n")
			td := startMilterDaemon(t, network, clock, fmt.Sprintf("whitelist = %q\nmetrics_listen = \"127.0.0.1:0\"\n", wl))
			ip, sender := "192.0.2.7", "alice@sender.example"
			want := func(got milterMessage, wantRcpts []string, wantHeaders ...string) {
				t.Helper()
				if fmt.Sprint(got.rcpts) != fmt.Sprint(wantRcpts) || fmt.Sprint(got.headers) != fmt.Sprint(wantHeaders) {
					t.Fatalf("got recipients %q headers %q, want %q and %q", got.rcpts, got.headers, wantRcpts, wantHeaders)
				}
			}
			want(milterSend(t, td, ip, sender, nil, "bob@rcpt.example"),
				[]string{"451 4.7.1 Greylisted, please try again in 300 seconds"})
			clock.advance(2 * time.Minute)
			want(milterSend(t, td, ip, sender, nil, "bob@rcpt.example", "carol@rcpt.example"),
				[]string{"451 4.7.1 Greylisted, please try again in 180 seconds", "451 4.7.1 Greylisted, please try again in 300 seconds"})
			clock.advance(4 * time.Minute)
			want(milterSend(t, td, ip, sender, nil, "bob@rcpt.example", "carol@rcpt.example"),
				[]string{"continue", "continue"}, "X-Greylist: delayed 360 seconds by greydaemon")
			// Known now: no header, and the qmail front end agrees.
			want(milterSend(t, td, ip, sender, nil, "dave@rcpt.example"), []string{"continue"})
			if got := qmailAsk(t, td.addr, req(ip, sender, "erin@rcpt.example")); got != "\x01\x02" {
				t.Errorf("qmail query after the milter passed the client: %q, want known (0102)", got)
			}
			// Passed without a table entry.
			want(milterSend(t, td, "198.51.100.9", sender, nil, "bob@rcpt.example"), []string{"continue"})
			want(milterSend(t, td, "203.0.113.5", sender, map[string]string{"{auth_authen}": "frank"}, "bob@rcpt.example"), []string{"continue"})
			want(milterSend(t, td, "", sender, nil, "bob@rcpt.example"), []string{"continue"})
			if known, grey := td.table.counts(); known != 1 || grey != 2 {
				t.Errorf("table holds %d known IPs and %d grey triplets, want 1 and 2", known, grey)
			}
			var st Stats
			td.UpdateStats(&st)
			m := st.FrontEnds[1]
			if m.Name != "milter" || m.Verdicts[GreyNew.index()] != 2 || m.Verdicts[GreyTooSoon.index()] != 1 ||
				m.Verdicts[AcceptRetried.index()] != 1 || m.Verdicts[AcceptKnownIP.index()] != 2 ||
				m.Verdicts[AcceptWhitelisted.index()] != 1 || m.Unchecked != [numUnchecked]uint64{1, 1} || m.Requests != 9 {
				t.Errorf("milter stats %+v", m)
			}
			text := scrape(t, td.addrs["metrics"])
			for series, want := range map[string]float64{
				`greydaemon_decisions_total{action="greylist",frontend="milter",reason="new",reply="0001"}`:   2,
				`greydaemon_decisions_total{action="accept",frontend="milter",reason="retried",reply="0103"}`: 1,
				`greydaemon_unchecked_total{frontend="milter",reason="authenticated"}`:                        1,
				`greydaemon_unchecked_total{frontend="milter",reason="no_client_address"}`:                    1,
				`greydaemon_requests_total{frontend="milter"}`:                                                9,
				`greydaemon_decisions_total{action="accept",frontend="qmail",reason="known_ip",reply="0102"}`: 1,
			} {
				if got := metricValue(text, series); got != want {
					t.Errorf("%s = %v, want %v", series, got, want)
				}
			}
			out := td.out.String()
			for _, line := range []string{
				"new grey I192.0.2.7 Falice@sender.example Tbob@rcpt.example",
				"retry too soon I192.0.2.7 Falice@sender.example Tbob@rcpt.example",
				"retry ok I192.0.2.7 Falice@sender.example Tbob@rcpt.example",
				"authenticated I203.0.113.5 Falice@sender.example Tbob@rcpt.example",
				"no client address I Falice@sender.example Tbob@rcpt.example",
			} {
				if !regexp.MustCompile(`(?m)^milter ` + peerPattern(network) + " " + regexp.QuoteMeta(line) + "$").MatchString(out) {
					t.Errorf("decision log lacks %q:\n%s", line, out)
				}
			}
		})
	}
}

// qmailAsk sends one qmail request to addr and returns the 2-byte reply.
func qmailAsk(t *testing.T, addr *net.UDPAddr, request []byte) string {
	t.Helper()
	conn, err := net.DialUDP("udp", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return string(exchange(t, conn, request, 5*time.Second))
}

// rawMilter is a milter connection driven byte by byte, as a broken or
// hostile MTA would.
type rawMilter struct {
	t *testing.T
	net.Conn
}

// dialRawMilter connects to td's milter and, if negotiate, negotiates
// version 6 with every action and protocol option offered.
func dialRawMilter(t *testing.T, td *testDaemon, negotiate bool) *rawMilter {
	t.Helper()
	network, addr := milterAddr(td)
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := &rawMilter{t: t, Conn: c}
	if negotiate {
		r.send('O', binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 6), 0x1ff), 0x1fffff))
		if code, _ := r.read(); code != 'O' {
			t.Fatalf("negotiation answered with %q", code)
		}
	}
	return r
}

// send writes one packet.
func (r *rawMilter) send(code byte, data []byte) {
	r.t.Helper()
	r.sendRaw(append(binary.BigEndian.AppendUint32(nil, uint32(len(data)+1)), append([]byte{code}, data...)...))
}

// sendRaw writes bytes as they are.
func (r *rawMilter) sendRaw(b []byte) {
	r.t.Helper()
	r.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.Write(b); err != nil {
		r.t.Fatalf("write to the milter: %v", err)
	}
}

// read reads one packet; code 0 if the milter closed the connection.
func (r *rawMilter) read() (byte, []byte) {
	r.t.Helper()
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if isTimeout(err) {
			r.t.Fatal("the milter neither answered nor closed within 10 s")
		}
		return 0, nil
	}
	b := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	if _, err := io.ReadFull(r, b); err != nil || len(b) == 0 {
		r.t.Fatalf("short packet from the milter: %v", err)
	}
	return b[0], b[1:]
}

// TestMilterHostilePackets sends packets the library would take badly: of
// no bytes, of 2 GiB, and connect, MAIL and RCPT packets cut short. Each
// connection is closed and counted as malformed; the daemon goes on
// answering.
func TestMilterHostilePackets(t *testing.T) {
	clock := newFakeClock()
	td := startMilterDaemon(t, "tcp", clock, "")
	cases := []struct {
		name string
		raw  []byte
	}{
		{"empty packet", []byte{0, 0, 0, 0}},
		{"2 GiB packet", []byte{0x7f, 0xff, 0xff, 0xff, 'C'}},
		{"64 KiB + 1 packet", []byte{0, 1, 0, 1, 'C'}},
		{"connect without NUL", []byte("\x00\x00\x00\x04Cabc")},
		{"connect without family", []byte("\x00\x00\x00\x05Cabc\x00")},
		{"connect without port", []byte("\x00\x00\x00\x06Cabc\x004")},
		{"MAIL without NUL", []byte("\x00\x00\x00\x04M<a>")},
		{"RCPT without NUL", []byte("\x00\x00\x00\x04R<b>")},
	}
	for _, c := range cases {
		r := dialRawMilter(t, td, true)
		r.sendRaw(c.raw)
		if code, data := r.read(); code != 0 {
			t.Errorf("%s: answered %q %q, want the connection closed", c.name, code, data)
		}
	}
	got := milterSend(t, td, "192.0.2.7", "alice@sender.example", nil, "bob@rcpt.example")
	if len(got.rcpts) != 1 || !strings.HasPrefix(got.rcpts[0], "451 4.7.1 ") {
		t.Errorf("after the bad packets: %q", got.rcpts)
	}
	var st Stats
	td.UpdateStats(&st)
	if m := st.FrontEnds[1]; m.Malformed != uint64(len(cases)) {
		t.Errorf("malformed %d, want %d", m.Malformed, len(cases))
	}
	if log := td.out.String(); !strings.Contains(log, "bad req packet of 0 bytes") || !strings.Contains(log, "bad req connect without a family") {
		t.Errorf("decision log lacks the bad packets:\n%s", log)
	}
}

// TestMilterLimits drives the cap, the idle timeout and the allow list
// through the config file: a connection beyond milter_max_connections is
// closed at once, an idle one after milter_idle_timeout, and a peer
// outside allow is not answered.
func TestMilterLimits(t *testing.T) {
	clock := newFakeClock()
	td := startMilterDaemon(t, "tcp", clock, "milter_max_connections = 2\nmilter_idle_timeout = \"1s\"\n")
	a, b := dialRawMilter(t, td, true), dialRawMilter(t, td, true)
	if code, _ := dialRawMilter(t, td, false).read(); code != 0 {
		t.Errorf("a third connection was answered with %q, want closed", code)
	}
	start := time.Now()
	for _, r := range []*rawMilter{a, b} {
		if code, _ := r.read(); code != 0 {
			t.Errorf("an idle connection got %q, want closed", code)
		}
	}
	if waited := time.Since(start); waited < 500*time.Millisecond {
		t.Errorf("idle connections closed after %v, before the 1 s timeout", waited)
	}
	var st Stats
	td.UpdateStats(&st)
	if m := st.FrontEnds[1]; m.Refused != 1 {
		t.Errorf("refused %d, want 1 (the one beyond the cap)", m.Refused)
	}

	// The negotiation has the library's 1 s, whatever the idle timeout.
	other := startMilterDaemon(t, "tcp", clock, "allow = [\"127.0.0.0/8\"]\n")
	start = time.Now()
	if code, _ := dialRawMilter(t, other, false).read(); code != 0 || time.Since(start) > 5*time.Second {
		t.Errorf("a connection that never negotiates: %q after %v, want closed within 5 s (milter_idle_timeout is 1h)", code, time.Since(start))
	}

	other = startMilterDaemon(t, "tcp", clock, "allow = [\"192.0.2.0/24\"]\n")
	if code, _ := dialRawMilter(t, other, false).read(); code != 0 {
		t.Errorf("a peer outside allow was answered with %q", code)
	}
}

// TestMilterStopGrace stops the daemon in the middle of a conversation:
// a recipient sent within stopGrace is still answered, and the final save
// holds its triplet.
func TestMilterStopGrace(t *testing.T) {
	clock := newFakeClock()
	state := filepath.Join(t.TempDir(), "state")
	conf := writeTemp(t, "greydaemon.toml", "milter_listen = \"127.0.0.1:0\"\n")
	td := startTestDaemon(t, func() (*Settings, error) { return parseCommandLine([]string{"-c", conf, "127.0.0.1:0", state}) }, clock.now, nil)
	r := dialRawMilter(t, td, true)
	r.send('C', []byte("client.example\x004\x10\x00192.0.2.7\x00"))
	r.send('M', []byte("<alice@sender.example>\x00"))
	stopped := make(chan error, 1)
	go func() { stopped <- td.stop(t) }()
	time.Sleep(300 * time.Millisecond)
	r.send('R', []byte("<bob@rcpt.example>\x00"))
	if code, data := r.read(); code != 'y' || !strings.Contains(string(data), "451 4.7.1 Greylisted") {
		t.Fatalf("RCPT during the stop grace: %q %q, want a 451 reply", code, data)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon did not stop within 10 s")
	}
	if n := greyInState(t, state); n != 1 {
		t.Errorf("final save holds %d grey triplets, want 1", n)
	}
}

// TestMilterNullSender decides a null sender's recipients at RCPT by
// default, and at DATA with milter_delayed_reject: every recipient gets
// its triplet, and one greylisted recipient defers the whole message. A
// reload turns it on, the header off and changes the text.
func TestMilterNullSender(t *testing.T) {
	clock := newFakeClock()
	conf := writeTemp(t, "greydaemon.toml", "milter_listen = \"127.0.0.1:0\"\n")
	reloaded := make(chan error, 1)
	td := startTestDaemon(t, settingsFromFile(t, conf), clock.now, func(d *daemon) { d.onReload = func(err error) { reloaded <- err } })
	got := milterSend(t, td, "192.0.2.7", "", nil, "bob@rcpt.example", "carol@rcpt.example")
	if fmt.Sprint(got.rcpts) != "[451 4.7.1 Greylisted, please try again in 300 seconds 451 4.7.1 Greylisted, please try again in 300 seconds]" {
		t.Fatalf("null sender by default: %q", got.rcpts)
	}
	os.WriteFile(conf, []byte("milter_listen = \"127.0.0.1:0\"\nmilter_delayed_reject = true\nmilter_add_header = false\npolicy_defer_text = \"Come back in %s s\"\n"), 0o644)
	td.signals <- syscall.SIGHUP
	if err := <-reloaded; err != nil {
		t.Fatal(err)
	}
	got = milterSend(t, td, "192.0.2.8", "", nil, "bob@rcpt.example", "carol@rcpt.example")
	if fmt.Sprint(got.rcpts) != "[continue continue]" || got.data != "451 4.7.1 Come back in 300 s" {
		t.Fatalf("null sender held for DATA: recipients %q, DATA %q", got.rcpts, got.data)
	}
	if _, grey := td.table.counts(); grey != 4 {
		t.Errorf("%d grey triplets, want 4 (each recipient decided)", grey)
	}
	// At most 1,000 recipients are held; the next is decided at RCPT.
	many := make([]string, 1001)
	for i := range many {
		many[i] = fmt.Sprintf("r%d@rcpt.example", i)
	}
	got = milterSend(t, td, "192.0.2.9", "", nil, many...)
	if got.rcpts[999] != "continue" || !strings.HasPrefix(got.rcpts[1000], "451 4.7.1 ") || !strings.HasPrefix(got.data, "451 4.7.1 ") {
		t.Fatalf("1,001 recipients held: the 1,000th %q, the 1,001st %q, DATA %q", got.rcpts[999], got.rcpts[1000], got.data)
	}
	clock.advance(6 * time.Minute)
	got = milterSend(t, td, "192.0.2.8", "", nil, "bob@rcpt.example", "carol@rcpt.example")
	if fmt.Sprint(got.rcpts) != "[continue continue]" || got.data != "continue" || len(got.headers) != 0 {
		t.Fatalf("retried null sender: recipients %q, DATA %q, headers %q (milter_add_header = false)", got.rcpts, got.data, got.headers)
	}
}

// milterPacket returns one packet's bytes.
func milterPacket(code byte, data string) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(data)+1)), append([]byte{code}, data...)...)
}

// FuzzMilterConnection feeds a milter conversation arbitrary bytes after
// a valid negotiation: whatever comes, nothing panics, the conversation
// ends when the input does, and every reply is a whole packet.
func FuzzMilterConnection(f *testing.F) {
	var conv []byte
	for _, p := range [][]byte{
		milterPacket('D', "M{auth_authen}\x00\x00"),
		milterPacket('C', "client.example\x004\x10\x00192.0.2.7\x00"),
		milterPacket('M', "<alice@sender.example>\x00"),
		milterPacket('R', "<bob@rcpt.example>\x00"),
		milterPacket('R', "<carol@rcpt.example>\x00"),
		milterPacket('T', ""),
		milterPacket('E', ""),
		milterPacket('A', ""),
		milterPacket('Q', ""),
	} {
		conv = append(conv, p...)
	}
	f.Add(conv)
	f.Add(append(milterPacket('C', "h\x006\x00\x19IPv6:2001:db8::1\x00"), milterPacket('M', "<>\x00")...))
	f.Add(append(milterPacket('C', "h\x00L\x00\x00/tmp/x\x00"), milterPacket('R', "<x>\x00SIZE=1\x00")...))
	f.Add([]byte("\x00\x00\x00\x02Cx"))
	f.Fuzz(func(t *testing.T, input []byte) {
		g, _ := newTestGreylister(t, "")
		m := newMilterServer(nil, "", newLogger(io.Discard, false), 1)
		m.g, m.dlog = g, newDecisionLog(io.Discard)
		text, _ := parseDeferText(defaultDeferText)
		m.replies.Store(&milterReplies{deferText: text, header: true, delayedReject: len(input)%2 == 0})
		server, client := socketPair(t)
		done := make(chan struct{})
		go func() {
			m.accept(server)
			server.Close()
			close(done)
		}()
		go func() {
			client.Write(milterPacket('O', "\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"))
			client.Write(input)
			client.CloseWrite()
		}()
		out, _ := io.ReadAll(client)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the conversation did not end within 10 s of its input")
		}
		for len(out) > 0 {
			if len(out) < 5 {
				t.Fatalf("a reply cut short: %q", out)
			}
			n := binary.BigEndian.Uint32(out)
			if n == 0 || int(n) > len(out)-4 {
				t.Fatalf("a reply of %d bytes with %d left: %q", n, len(out)-4, out)
			}
			out = out[4+n:]
		}
	})
}

// TestFrontEndsDecideAlike runs one random sequence of triplets and clock
// jumps through three daemons, one asked over qmail's UDP, one over
// Postfix's policy protocol and one over the milter protocol, and checks
// that each step gets the same verdict from all three, and the same
// seconds left from the two that say them. No sweep runs: a triplet past
// its window is stale while held and new once swept (PROTOCOL.md §4.5), and
// the three daemons' sweepers would run at different times.
func TestFrontEndsDecideAlike(t *testing.T) {
	clock := newFakeClock()
	start := func(conf string) *testDaemon {
		noSweep := func(d *daemon) { d.sweepEvery = 24 * time.Hour }
		return startTestDaemon(t, settingsFromFile(t, writeTemp(t, "greydaemon.toml", conf)), clock.now, noSweep)
	}
	qmail := start("")
	policy := start("policy_listen = \"127.0.0.1:0\"\n")
	milterd := start("milter_listen = \"127.0.0.1:0\"\n")
	pc := dialPolicy(t, policy.addrs["postfix"])
	ips := []string{"192.0.2.1", "192.0.2.2", "198.51.100.3"}
	senders := []string{"alice@sender.example", "", "bob@other.example"}
	rcpts := []string{"carol@rcpt.example", "dave@rcpt.example", "list-erin=x@rcpt.example"}
	jumps := []time.Duration{0, 0, time.Second, time.Minute, 4 * time.Minute, 5 * time.Minute, 6 * time.Minute, 11 * time.Hour, 13 * time.Hour, 8 * 24 * time.Hour}
	rng := rand.New(rand.NewPCG(19, 7))
	verdictOf := func(td *testDaemon, ask func()) Verdict {
		t.Helper()
		var before, after Stats
		td.UpdateStats(&before)
		ask()
		td.UpdateStats(&after)
		fe := len(after.FrontEnds) - 1
		if td == qmail {
			fe = 0
		}
		for i, v := range verdicts {
			if after.FrontEnds[fe].Verdicts[i] != before.FrontEnds[fe].Verdicts[i] {
				return v
			}
		}
		t.Fatalf("no verdict counted")
		return 0
	}
	seconds := regexp.MustCompile(`again in (\d+) seconds`)
	seen := map[Verdict]bool{}
	for step := 0; step < 300; step++ {
		clock.advance(jumps[rng.IntN(len(jumps))])
		ip, sender, rcpt := ips[rng.IntN(len(ips))], senders[rng.IntN(len(senders))], rcpts[rng.IntN(len(rcpts))]
		var qReply, pReply string
		var mReply milterMessage
		qv := verdictOf(qmail, func() { qReply = qmailAsk(t, qmail.addr, req(ip, sender, rcpt)) })
		pv := verdictOf(policy, func() { pReply = pc.ask(ip, sender, rcpt) })
		mv := verdictOf(milterd, func() { mReply = milterSend(t, milterd, ip, sender, nil, rcpt) })
		if qv != pv || qv != mv || qReply != string([]byte{byte(qv >> 8), byte(qv)}) {
			t.Fatalf("step %d (%s %q %s): qmail %04x (%q), postfix %04x, milter %04x", step, ip, sender, rcpt, uint16(qv), qReply, uint16(pv), uint16(mv))
		}
		seen[qv] = true
		p, m := seconds.FindStringSubmatch(pReply), seconds.FindStringSubmatch(mReply.rcpts[0])
		if (p == nil) != qv.Accepts() || (m == nil) != qv.Accepts() || p != nil && p[1] != m[1] {
			t.Fatalf("step %d: verdict %04x, postfix %q, milter %q", step, uint16(qv), pReply, mReply.rcpts[0])
		}
	}
	if len(seen) != 6 { // all but whitelisted, which no client is
		t.Errorf("the sequence gave only the verdicts %v", seen)
	}
}

// TestMilterSharedInRedis greylists through one daemon's milter and
// retries through another's, both deciding in one Redis: the retry passes
// with its header, and the client is then known to a third daemon's qmail
// side too. Nothing is decided in the local tables.
func TestMilterSharedInRedis(t *testing.T) {
	port, _ := startRedis(t, 0)
	clock := newFakeClock()
	redisLine := fmt.Sprintf("redis_url = \"redis://127.0.0.1:%d/0\"\n", port)
	a, b := startMilterDaemon(t, "tcp", clock, redisLine), startMilterDaemon(t, "unix", clock, redisLine)
	qmail := startRedisDaemon(t, port, clock)
	waitRedisConnected(t, a)
	waitRedisConnected(t, b)
	got := milterSend(t, a, "192.0.2.7", "alice@sender.example", nil, "bob@rcpt.example")
	if len(got.rcpts) != 1 || got.rcpts[0] != "451 4.7.1 Greylisted, please try again in 300 seconds" {
		t.Fatalf("first attempt at one host: %q", got.rcpts)
	}
	clock.advance(6 * time.Minute)
	got = milterSend(t, b, "192.0.2.7", "alice@sender.example", nil, "bob@rcpt.example")
	if fmt.Sprint(got.rcpts, got.headers) != "[continue] [X-Greylist: delayed 360 seconds by greydaemon]" {
		t.Fatalf("retry at the other host: %q %q", got.rcpts, got.headers)
	}
	if reply := qmailAsk(t, qmail.addr, req("192.0.2.7", "x@y", "z@w")); reply != "\x01\x02" {
		t.Errorf("qmail at a third host: %q, want known (0102)", reply)
	}
	for _, td := range []*testDaemon{a, b} {
		if known, grey := td.table.counts(); known+grey != 0 {
			t.Errorf("a local table holds %d known IPs and %d grey triplets", known, grey)
		}
	}
}

// TestMilterNegotiation pins what greydaemon asks of an MTA that offers
// everything: protocol version 6; the actions to add headers and to set
// the macro list (0x101); no HELO, headers, end of headers, body, unknown
// commands or DATA, and no replies to connect, HELO and MAIL; and the one
// macro {auth_authen} at MAIL (stage 2). An MTA that offers only version
// 2's options gets those it offers.
func TestMilterNegotiation(t *testing.T) {
	td := startMilterDaemon(t, "tcp", newFakeClock(), "")
	r := dialRawMilter(t, td, false)
	r.send('O', []byte("\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"))
	code, data := r.read()
	if code != 'O' || len(data) < 12 {
		t.Fatalf("negotiation reply %q %q", code, data)
	}
	version, actions, protocol := binary.BigEndian.Uint32(data), binary.BigEndian.Uint32(data[4:]), binary.BigEndian.Uint32(data[8:])
	const noHelo, noBody, noHeaders, noEOH, noUnknown, noData = 1 << 1, 1 << 4, 1 << 5, 1 << 6, 1 << 8, 1 << 9
	const nrConn, nrHelo, nrMail = 1 << 12, 1 << 13, 1 << 14
	if want := uint32(noHelo | noBody | noHeaders | noEOH | noUnknown | noData | nrConn | nrHelo | nrMail); version != 6 || actions != 0x101 || protocol != want {
		t.Errorf("negotiated version %d actions %#x protocol %#x, want 6, 0x101, %#x", version, actions, protocol, want)
	}
	if macros := string(data[12:]); macros != "\x00\x00\x00\x02{auth_authen}\x00" {
		t.Errorf("macros asked for: %q, want {auth_authen} at MAIL", macros)
	}

	r = dialRawMilter(t, td, false)
	r.send('O', []byte("\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x7f"))
	code, data = r.read()
	if code != 'O' || len(data) != 12 || binary.BigEndian.Uint32(data) != 2 || binary.BigEndian.Uint32(data[4:]) != 1 ||
		binary.BigEndian.Uint32(data[8:]) != noHelo|noBody|noHeaders|noEOH {
		t.Errorf("version 2 negotiation reply %q %q", code, data)
	}
}
