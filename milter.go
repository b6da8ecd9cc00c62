package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/d--j/go-milter"
)

// This file is the milter front end, for Sendmail and every MTA that asks
// filters over the milter protocol (Postfix's smtpd_milters too): PROTOCOL.md
// §10. The protocol is github.com/d--j/go-milter's; greydaemon gives it the
// connections its connSet accepted (the cap, the allow list, deadlines and
// the bounded stop of the other stream front ends), each through a
// milterConn that checks every packet before the library reads it. Each
// recipient is one decision on the table, as a Postfix policy request is.

// Limits and timeouts of a milter connection.
const (
	// milterMaxPacket bounds one packet from the MTA. greydaemon asks for
	// neither headers nor body, so that the longest packets are macros and
	// envelope addresses: 64 KiB, the protocol's default chunk, is plenty.
	milterMaxPacket = 64 << 10
	// milterWriteTimeout bounds one reply: the MTA waits for it, so an
	// MTA that does not take it within this is stuck or not one.
	milterWriteTimeout = 10 * time.Second
	// milterMaxHeld and milterMaxHeldBytes bound the recipients of one
	// null-sender message held for a decision at DATA
	// (milter_delayed_reject), and their bytes; beyond either, recipients
	// are decided at RCPT.
	milterMaxHeld      = 1000
	milterMaxHeldBytes = 64 << 10
)

// The macro the milter asks for: the SMTP AUTH identity, set when the
// client authenticated. The client address comes with the connect event.
const macroAuthAuthen = "{auth_authen}"

// milterWanted are the protocol options greydaemon asks the MTA for, each
// one it offers: no events that do not decide anything, no waiting for
// replies that are always "continue".
const milterWanted = milter.OptNoHelo | milter.OptNoHeaders | milter.OptNoEOH | milter.OptNoBody |
	milter.OptNoUnknown | milter.OptNoConnReply | milter.OptNoHeloReply | milter.OptNoMailReply

// milterReplies are the milter settings a reload may change.
type milterReplies struct {
	deferText     deferText
	header        bool // X-Greylist on a message that passed after a retry
	delayedReject bool // decide a null sender's recipients at DATA
}

// A milterServer answers milter conversations on one listener.
type milterServer struct {
	g          *Greylister
	ln         net.Listener
	unixPath   string // the socket file, removed at close; "" for TCP
	dlog       *decisionLog
	log        *logger
	conns      *connSet
	idle       atomic.Int64    // milter_idle_timeout, in nanoseconds
	libOptions []milter.Option // the library's options but the conversation's own

	allow   atomic.Pointer[IPRanges] // TCP peers answered; nil: all
	replies atomic.Pointer[milterReplies]
	defers  replyCache

	stripes [16]milterCounts // counters, striped by connection
	nextID  atomic.Uint64
}

// milterCounts is one stripe of the milter server's counters.
type milterCounts struct {
	policyCounts
	authenticated, unaddressed atomic.Uint64 // passed without a decision
}

// newMilterServer returns a milter server on ln (a unix socket at
// unixPath, or TCP), with at most max connections at once.
func newMilterServer(ln net.Listener, unixPath string, log *logger, max int) *milterServer {
	m := &milterServer{ln: ln, unixPath: unixPath, log: log, conns: newConnSet(max)}
	// A conversation is part of an SMTP session: a stop lets it go on for
	// stopGrace, in which most sessions end, before cutting it.
	m.conns.readGrace = stopGrace
	m.replies.Store(&milterReplies{})
	m.idle.Store(int64(time.Hour))
	m.libOptions = []milter.Option{
		milter.WithNegotiationCallback(m.negotiate),
		milter.WithMacroRequest(milter.StageMail, []milter.MacroName{macroAuthAuthen}),
		milter.WithWriteTimeout(milterWriteTimeout),
	}
	return m
}

// Name returns "milter".
func (m *milterServer) Name() string { return "milter" }

// Addr returns the address the server answers on.
func (m *milterServer) Addr() net.Addr { return m.ln.Addr() }

// Serve accepts connections until Close, then waits for each conversation
// to end, within stopGrace.
func (m *milterServer) Serve() error {
	milterLog.Store(m.log)
	m.conns.serve(m.ln, m.unixPath, "milter", m.log, m.accept, func(c net.Conn) {
		m.stripe().refused.Add(1)
		if m.dlog.allowBad(m.g.now()) {
			m.log.Warnf("milter: %d connections open, the most milter_max_connections allows; closing a new one from %s",
				m.conns.max, c.RemoteAddr())
		}
	})
	return nil
}

// stripe returns the counters of the next connection.
func (m *milterServer) stripe() *milterCounts {
	return &m.stripes[m.nextID.Add(1)%uint64(len(m.stripes))]
}

// accept runs the conversation on c, unless c comes from outside the allow
// list, and returns when it is over. The library serves the one
// connection, so that the conversation's state knows its connection.
func (m *milterServer) accept(c net.Conn) {
	counts := m.stripe()
	if !peerAllowed(m.allow.Load(), c.RemoteAddr()) {
		counts.refused.Add(1)
		return
	}
	mc := &milterConn{Conn: c, server: m, counts: counts, closed: make(chan struct{})}
	session := milter.WithDynamicMilter(func(_ uint32, actions milter.OptAction, protocol milter.OptProtocol, _ milter.DataSize) milter.Milter {
		return m.newSession(mc, actions, protocol)
	})
	lib := milter.NewServer(append(m.libOptions[:len(m.libOptions):len(m.libOptions)], session)...)
	lib.Serve(&oneConnListener{conn: mc}) // returns once the conversation is over
}

// Close stops accepting; every conversation may go on for stopGrace (an
// SMTP session in its last commands finishes), then its reads fail and its
// writes stop waiting.
func (m *milterServer) Close() error { return m.conns.close(m.ln) }

// UpdateStats adds what the server did so far to st.
func (m *milterServer) UpdateStats(st *FrontEndStats) {
	st.Decides, st.PassesUnchecked = true, true
	for i := range m.stripes {
		c := &m.stripes[i]
		c.addTo(st)
		st.Unchecked[uncheckedAuthenticated] += c.authenticated.Load()
		st.Unchecked[uncheckedNoAddress] += c.unaddressed.Load()
	}
}

// negotiate settles a connection's options: the MTA's protocol version up
// to 6, the X-Greylist header and the macro list if the MTA offers them
// (a conversation goes on without), and of the events and replies it can
// leave out, those greydaemon does not need.
func (m *milterServer) negotiate(mtaVersion, milterVersion uint32, mtaActions, _ milter.OptAction, mtaProtocol, _ milter.OptProtocol, _ milter.DataSize) (uint32, milter.OptAction, milter.OptProtocol, milter.DataSize, error) {
	if mtaVersion < 2 {
		return 0, 0, 0, 0, fmt.Errorf("milter protocol version %d is too old (want 2 to 6)", mtaVersion)
	}
	wanted := milterWanted
	if !m.replies.Load().delayedReject {
		wanted |= milter.OptNoData
	}
	actions := mtaActions & (milter.OptAddHeader | milter.OptSetMacros)
	return min(mtaVersion, milterVersion), actions, mtaProtocol & wanted, milter.DataSize64K, nil
}

// newSession returns the state of one conversation, for the options
// negotiate settled.
func (m *milterServer) newSession(mc *milterConn, actions milter.OptAction, protocol milter.OptProtocol) milter.Milter {
	s := &milterSession{m: m, counts: mc.counts, peer: peerOf(mc.Conn),
		canAddHeader: actions&milter.OptAddHeader != 0, seesData: protocol&milter.OptNoData == 0}
	s.kb.buf = make([]byte, 0, 512)
	s.logb = make([]byte, 0, 512)
	return s
}

// milterLog is the logger of the milter server started last, which the
// library's own warnings (a peer that hung up, a deadline that passed) go
// to in debug mode.
var milterLog atomic.Pointer[logger]

func init() {
	milter.LogWarning = func(format string, args ...any) {
		if l := milterLog.Load(); l != nil {
			l.Debugf("milter: "+format, args...)
		}
	}
}

// A oneConnListener yields one connection, then waits for it to close and
// says it is closed itself, so that the library serves that connection and
// returns.
type oneConnListener struct {
	conn  *milterConn
	taken bool
}

// Accept returns the connection the first time; then it waits for the
// conversation to end and returns net.ErrClosed.
func (l *oneConnListener) Accept() (net.Conn, error) {
	if !l.taken {
		l.taken = true
		return l.conn, nil
	}
	<-l.conn.closed
	return nil, net.ErrClosed
}

// Close does nothing: the connection's end closes the listener.
func (l *oneConnListener) Close() error { return nil }

// Addr returns the connection's local address.
func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

// errBadPacket ends a conversation whose MTA sent a packet greydaemon
// does not take.
var errBadPacket = errors.New("bad milter packet")

// A milterConn is a connection as the library reads it: whole packets,
// each checked first, so that no packet can make the library allocate
// more than milterMaxPacket or index past its end; deadlines that the
// server's stop has set cannot be undone; and an idle deadline.
type milterConn struct {
	net.Conn
	server  *milterServer
	counts  *milterCounts
	pending []byte    // checked bytes the library has not read yet
	buf     []byte    // the packet being read
	idleEnd time.Time // the read deadline set for idleness; zero if none
	libRead bool      // the library set a read deadline of its own (1 s for the negotiation)
	closed  chan struct{}
	once    sync.Once
}

// Read gives the library the bytes of checked packets.
func (c *milterConn) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		if err := c.readPacket(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// readPacket reads and checks the next packet.
func (c *milterConn) readPacket() error {
	c.extendIdle()
	c.buf = slices.Grow(c.buf[:0], 512)[:4]
	if _, err := io.ReadFull(c.Conn, c.buf); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(c.buf)
	if n == 0 || n > milterMaxPacket {
		c.bad(fmt.Sprintf("packet of %d bytes", n))
		return errBadPacket
	}
	c.buf = slices.Grow(c.buf, int(n))[:4+n]
	if _, err := io.ReadFull(c.Conn, c.buf[4:]); err != nil {
		return err
	}
	if what := checkMilterPacket(c.buf[4], c.buf[5:]); what != "" {
		c.bad(what)
		return errBadPacket
	}
	c.pending = c.buf
	return nil
}

// extendIdle moves the idle deadline on, once per half of the timeout:
// setting one costs a timer update. A deadline the library set for this
// read stands.
func (c *milterConn) extendIdle() {
	if c.libRead {
		return
	}
	idle := time.Duration(c.server.idle.Load())
	if now := time.Now(); now.After(c.idleEnd.Add(-idle / 2)) {
		end := now.Add(idle)
		if c.server.conns.setReadDeadline(c.Conn, end) {
			c.idleEnd = end
		}
	}
}

// checkMilterPacket returns what is wrong with a packet of the command
// code with data, or "": the checks the library leaves out before
// slicing.
func checkMilterPacket(code byte, data []byte) string {
	switch code {
	case 'C': // connect: host name NUL family [port address]
		i := bytes.IndexByte(data, 0)
		if i < 0 || i+1 >= len(data) {
			return "connect without a family"
		}
		if f := data[i+1]; (f == '4' || f == '6' || f == 'L') && len(data) < i+4 {
			return "connect without a port"
		}
	case 'M', 'R': // MAIL, RCPT: address NUL [arguments]
		if bytes.IndexByte(data, 0) < 0 {
			return "unterminated address"
		}
	}
	return ""
}

// bad counts a connection cut for a bad packet and logs it, rate-limited.
func (c *milterConn) bad(what string) {
	c.counts.malformed.Add(1)
	s := c.server
	if s.dlog != nil && s.dlog.allowBad(s.g.now()) {
		line := appendDecisionLine(nil, "milter", peerOf(c.Conn), "bad req "+what, nil, nil, nil)
		s.dlog.write(line)
	}
}

// SetDeadline sets the deadlines unless the server is stopping.
func (c *milterConn) SetDeadline(t time.Time) error {
	c.server.conns.setDeadline(c.Conn, t)
	return nil
}

// SetReadDeadline sets the read deadline unless the server is stopping.
func (c *milterConn) SetReadDeadline(t time.Time) error {
	if c.server.conns.setReadDeadline(c.Conn, t) {
		c.idleEnd, c.libRead = time.Time{}, !t.IsZero() // the library's own: set the idle one again after it
	}
	return nil
}

// SetWriteDeadline sets the write deadline unless the server is stopping.
func (c *milterConn) SetWriteDeadline(t time.Time) error {
	c.server.conns.unlessClosing(func() { c.Conn.SetWriteDeadline(t) })
	return nil
}

// Close ends the conversation: the connSet closes the connection.
func (c *milterConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

// A milterSession is one conversation: one SMTP session of the MTA, with
// its messages one after the other.
type milterSession struct {
	milter.NoOpMilter
	m            *milterServer
	counts       *milterCounts
	canAddHeader bool // the MTA lets the milter add headers
	seesData     bool // the MTA sends the DATA event

	peer    string
	client  []byte // the SMTP client's address; nil if it has none (a local submission)
	sender  []byte
	authed  bool     // the client authenticated (SMTP AUTH)
	held    [][]byte // recipients of a null-sender message, for DATA
	heldBuf []byte   // their bytes
	delayed uint32   // the longest delay of a recipient passed after a retry; 0 if none

	kb   keyBuilder
	logb []byte
}

// Connect records the client's address.
func (s *milterSession) Connect(host, family string, port uint16, addr string, m milter.Modifier) (*milter.Response, error) {
	s.client = nil
	if family == "tcp4" || family == "tcp6" {
		s.client = []byte(addr)
	}
	return milter.RespContinue, nil
}

// MailFrom starts a message.
func (s *milterSession) MailFrom(from, _ string, m milter.Modifier) (*milter.Response, error) {
	s.reset()
	s.sender = append(s.sender[:0], from...)
	s.authed = m.Get(macroAuthAuthen) != ""
	return milter.RespContinue, nil
}

// reset forgets the message.
func (s *milterSession) reset() {
	s.sender, s.authed, s.delayed = s.sender[:0], false, 0
	s.held, s.heldBuf = s.held[:0], s.heldBuf[:0]
}

// RcptTo decides one recipient, or holds it for DATA.
func (s *milterSession) RcptTo(rcpt, _ string, m milter.Modifier) (*milter.Response, error) {
	replies := s.m.replies.Load()
	if s.seesData && replies.delayedReject && isNullSender(s.sender) && s.client != nil && !s.authed &&
		len(s.held) < milterMaxHeld && len(s.heldBuf)+len(rcpt) <= milterMaxHeldBytes {
		off := len(s.heldBuf)
		s.heldBuf = append(s.heldBuf, rcpt...)
		s.held = append(s.held, s.heldBuf[off:len(s.heldBuf):len(s.heldBuf)])
		return milter.RespContinue, nil
	}
	left, ok := s.decide([]byte(rcpt))
	if ok {
		return milter.RespContinue, nil
	}
	return s.deferReply(replies, left, []byte(rcpt))
}

// Data decides the held recipients of a null-sender message: one
// greylisted recipient defers the whole message.
func (s *milterSession) Data(m milter.Modifier) (*milter.Response, error) {
	var worst []byte
	var worstLeft uint32
	for _, rcpt := range s.held {
		if left, ok := s.decide(rcpt); !ok && (worst == nil || left > worstLeft) {
			worst, worstLeft = rcpt, left
		}
	}
	s.held = s.held[:0]
	if worst == nil {
		return milter.RespContinue, nil
	}
	return s.deferReply(s.m.replies.Load(), worstLeft, worst)
}

// deferReply returns the 451 reply for a recipient with left seconds to
// wait.
func (s *milterSession) deferReply(replies *milterReplies, left uint32, rcpt []byte) (*milter.Response, error) {
	text := replies.deferText.appendTo(append(s.logb[:0], "4.7.1 "...), left, rcpt)
	return s.m.defers.get(text)
}

// replyCacheSize bounds the replies a replyCache holds: one per seconds
// left and recipient domain in the text.
const replyCacheSize = 1024

// A replyCache holds the 451 replies made so far, by their text: the
// library formats a reply through a chain of text transformers, which
// costs more than the decision. Replies are read-only once made.
type replyCache struct {
	mu sync.Mutex
	m  map[string]*milter.Response
}

// get returns the 451 reply with text.
func (c *replyCache) get(text []byte) (*milter.Response, error) {
	c.mu.Lock()
	r := c.m[string(text)]
	c.mu.Unlock()
	if r != nil {
		return r, nil
	}
	r, err := milter.RejectWithCodeAndReason(451, string(text))
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= replyCacheSize {
		c.m = make(map[string]*milter.Response)
	}
	c.m[string(text)] = r
	c.mu.Unlock()
	return r, nil
}

// EndOfMessage adds the X-Greylist header to a message that passed after
// a retry.
func (s *milterSession) EndOfMessage(m milter.Modifier) (*milter.Response, error) {
	if s.delayed > 0 && s.canAddHeader && s.m.replies.Load().header {
		value := "delayed " + strconv.FormatUint(uint64(s.delayed), 10) + " seconds by greydaemon"
		if err := m.AddHeader("X-Greylist", value); err != nil {
			return nil, err
		}
	}
	s.reset()
	return milter.RespContinue, nil
}

// Abort forgets the message.
func (s *milterSession) Abort(m milter.Modifier) error {
	s.reset()
	return nil
}

// decide decides one recipient, counts and logs it, and returns the
// seconds left before a retry passes and whether it passed now.
func (s *milterSession) decide(rcpt []byte) (left uint32, ok bool) {
	m := s.m
	counts := s.counts
	counts.requests.Add(1)
	counts.replies.Add(1)
	var event string
	switch {
	case s.authed:
		counts.authenticated.Add(1)
		event, ok = "authenticated", true
	case s.client == nil:
		counts.unaddressed.Add(1)
		event, ok = "no client address", true
	default:
		g := m.g
		v, age := g.decideRecipient(&s.kb, g.ParseClient(s.client), s.sender, rcpt, g.clock())
		counts.verdicts[v.index()].Add(1)
		event, ok = v.Event(), v.Accepts()
		if v == AcceptRetried && age > s.delayed {
			s.delayed = age
		}
		if !ok {
			left = g.Policy().MinResendDelay
			if v == GreyTooSoon {
				left -= min(age, left)
			}
		}
	}
	if m.dlog != nil {
		s.logb = appendDecisionLine(s.logb[:0], "milter", s.peer, event, s.client, s.sender, rcpt)
		m.dlog.write(s.logb)
	}
	return left, ok
}
