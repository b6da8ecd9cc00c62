package main

import (
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"
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
			td := startMilterDaemon(t, network, clock, fmt.Sprintf("whitelist = %q\n", wl))
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
