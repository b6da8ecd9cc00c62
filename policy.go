package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// This file is the Postfix front end: policy delegation as Postfix's
// SMTPD_POLICY_README describes it (PROTOCOL.md §8). Postfix's smtpd
// connects, sends a request of name=value lines ended by an empty line for
// each recipient, reads one action=... line and an empty line, and keeps
// the connection for its next requests. Each request is one recipient of
// the qmail decision, on the same table.

// Limits on what a client may send.
const (
	policyMaxLine    = 4096     // one attribute line; Postfix's longest are certificate names
	policyMaxRequest = 64 << 10 // one request, all its lines
)

// policyAddress parses policy_listen: "" (off), "unix:/path", or
// "host:port". It returns the network and address for net.Listen.
func policyAddress(s string) ([2]string, error) {
	switch {
	case s == "":
		return [2]string{}, nil
	case strings.HasPrefix(s, "unix:"):
		path := strings.TrimPrefix(s, "unix:")
		if path == "" {
			return [2]string{}, errors.New(`want "unix:/path/to/socket"`)
		}
		return [2]string{"unix", path}, nil
	}
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return [2]string{}, fmt.Errorf(`want "host:port" or "unix:/path", got %q`, s)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return [2]string{}, fmt.Errorf("bad port %q in %q", port, s)
	}
	return [2]string{"tcp", s}, nil
}

// A deferText is policy_defer_text split at its placeholders, so that a
// reply is built by appending, without formatting or allocating: %s is the
// seconds left before a retry passes, %r the recipient's domain, %% a
// percent sign.
type deferText []deferPart

type deferPart struct {
	literal string
	verb    byte // 's', 'r', or 0 for the literal
}

// checkDeferText reports what is wrong with a policy_defer_text value.
func checkDeferText(s string) error {
	_, err := parseDeferText(s)
	return err
}

// parseDeferText splits s at its placeholders.
func parseDeferText(s string) (deferText, error) {
	if len(s) > 400 {
		return nil, fmt.Errorf("must be at most 400 bytes, got %d", len(s))
	}
	var parts deferText
	var lit strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c == 0x7f {
			return nil, fmt.Errorf("must not hold control characters (found %q)", c)
		}
		if c != '%' {
			lit.WriteByte(c)
			continue
		}
		if i+1 == len(s) {
			return nil, errors.New(`ends in a lone "%"; write "%%" for a percent sign`)
		}
		i++
		switch s[i] {
		case '%':
			lit.WriteByte('%')
		case 's', 'r':
			if lit.Len() > 0 {
				parts = append(parts, deferPart{literal: lit.String()})
				lit.Reset()
			}
			parts = append(parts, deferPart{verb: s[i]})
		default:
			return nil, fmt.Errorf(`unknown placeholder "%%%c" (want %%s for the seconds left, %%r for the recipient's domain, %%%% for a percent sign)`, s[i])
		}
	}
	if lit.Len() > 0 {
		parts = append(parts, deferPart{literal: lit.String()})
	}
	return parts, nil
}

// appendTo appends the text with its placeholders filled.
func (t deferText) appendTo(dst []byte, secondsLeft uint32, rcpt []byte) []byte {
	for _, p := range t {
		switch p.verb {
		case 's':
			dst = strconv.AppendUint(dst, uint64(secondsLeft), 10)
		case 'r':
			if at := bytes.LastIndexByte(rcpt, '@'); at >= 0 {
				dst = appendPrintable(dst, rcpt[at+1:])
			}
		default:
			dst = append(dst, p.literal...)
		}
	}
	return dst
}

// appendPrintable appends the printable ASCII bytes of b, so that a reply
// line cannot be broken by what a client sent.
func appendPrintable(dst, b []byte) []byte {
	for _, c := range b {
		if c > 0x20 && c < 0x7f {
			dst = append(dst, c)
		}
	}
	return dst
}

// policyReplies are the reply settings a reload may change.
type policyReplies struct {
	deferText deferText
	prepend   bool
}

// A policyServer answers Postfix policy requests on one listener, with one
// goroutine per connection, each owning its buffers, so that a request
// allocates nothing once its connection is up.
type policyServer struct {
	g        *Greylister
	ln       net.Listener
	unixPath string // the socket file, removed at close; "" for TCP
	dlog     *decisionLog
	log      *logger
	conns    *connSet
	idle     atomic.Int64 // policy_idle_timeout, in nanoseconds

	allow   atomic.Pointer[IPRanges] // TCP peers answered; nil: all
	replies atomic.Pointer[policyReplies]

	stripes [16]policyCounts // counters, striped by connection
	nextID  atomic.Uint64
}

// policyCounts is one stripe of the policy server's counters.
type policyCounts struct {
	requests, malformed, refused, replies atomic.Uint64
	verdicts                              [numVerdicts]atomic.Uint64
	_                                     [64]byte
}

// listenStream binds a stream front end's listener, spec as
// policyAddress reads it: a TCP address, or a unix socket with the given
// mode, made by owner with the group gid (see listenUnix). purpose names
// what it answers, for errors. It returns the socket's path, "" for TCP.
func listenStream(spec string, mode os.FileMode, owner *fileOwner, gid int, purpose string) (net.Listener, string, error) {
	addr, err := policyAddress(spec)
	if err != nil {
		return nil, "", err
	}
	if addr[0] == "tcp" {
		ln, err := net.Listen("tcp", addr[1])
		if err != nil {
			return nil, "", fmt.Errorf("cannot listen on %s for %s: %w", addr[1], purpose, err)
		}
		return ln, "", nil
	}
	ln, err := listenUnix(addr[1], mode, owner, gid, purpose)
	if err != nil {
		return nil, "", err
	}
	return ln, addr[1], nil
}

// Name returns "postfix".
func (p *policyServer) Name() string { return "postfix" }

// Addr returns the address the server answers on.
func (p *policyServer) Addr() net.Addr { return p.ln.Addr() }

// Serve accepts connections until Close, then waits for each connection to
// finish the request it is answering.
func (p *policyServer) Serve() error {
	p.conns.serve(p.ln, p.unixPath, "policy", p.log, p.accept, func(c net.Conn) {
		id := p.nextID.Add(1)
		p.stripes[id%uint64(len(p.stripes))].refused.Add(1)
		if p.dlog.allowBad(p.g.now()) {
			p.log.Warnf("policy: %d connections open, the most policy_max_connections allows; closing a new one from %s",
				p.conns.max, c.RemoteAddr())
		}
	})
	return nil
}

// accept serves c, unless it comes from outside the allow list.
func (p *policyServer) accept(c net.Conn) {
	id := p.nextID.Add(1)
	counts := &p.stripes[id%uint64(len(p.stripes))]
	if !peerAllowed(p.allow.Load(), c.RemoteAddr()) {
		counts.refused.Add(1)
		return
	}
	p.serveConn(c, counts, int(id))
}

// Close stops accepting and makes every connection stop reading: each
// answers the request it has read, then closes.
func (p *policyServer) Close() error { return p.conns.close(p.ln) }

// UpdateStats adds what the server did so far to st.
func (p *policyServer) UpdateStats(st *FrontEndStats) {
	st.Decides = true
	for i := range p.stripes {
		p.stripes[i].addTo(st)
	}
}

// addTo adds the stripe's counts to st.
func (c *policyCounts) addTo(st *FrontEndStats) {
	st.Requests += c.requests.Load()
	st.Malformed += c.malformed.Load()
	st.Refused += c.refused.Load()
	st.Replies += c.replies.Load()
	for v := range c.verdicts {
		st.Verdicts[v] += c.verdicts[v].Load()
	}
}

// A policyRequest holds the attributes of one request that the decision
// uses, copied out of the connection's read buffer.
type policyRequest struct {
	buf                                  []byte // the values, back to back
	state, client, sender, rcpt, request span
	has                                  uint8 // attrXxx bits of the attributes seen
	size                                 int   // bytes of the request so far
}

// A span is a value's place in policyRequest.buf.
type span struct{ off, end int32 }

const (
	attrRequest = 1 << iota
	attrState
	attrClient
	attrSender
	attrRecipient
)

func (r *policyRequest) reset() {
	*r = policyRequest{buf: r.buf[:0]}
}

// get returns the value of the attribute bit, or nil if the request did
// not have it.
func (r *policyRequest) get(s span, bit uint8) []byte {
	if r.has&bit == 0 {
		return nil
	}
	return r.buf[s.off:s.end]
}

// add records one "name=value" line, if the decision uses it.
func (r *policyRequest) add(line []byte) {
	name, value, ok := bytes.Cut(line, []byte{'='})
	if !ok {
		return
	}
	var dst *span
	var bit uint8
	switch string(name) { // no allocation: the compiler compares in place
	case "request":
		dst, bit = &r.request, attrRequest
	case "protocol_state":
		dst, bit = &r.state, attrState
	case "client_address":
		dst, bit = &r.client, attrClient
	case "sender":
		dst, bit = &r.sender, attrSender
	case "recipient":
		dst, bit = &r.rcpt, attrRecipient
	default:
		return
	}
	off := len(r.buf)
	r.buf = append(r.buf, value...)
	*dst = span{int32(off), int32(len(r.buf))}
	r.has |= bit
}

// A policyConn is one connection's scratch space.
type policyConn struct {
	id    int // picks its log shard
	req   policyRequest
	kb    keyBuilder
	reply []byte
	logb  []byte
}

// serveConn answers the requests of one connection until it closes, goes
// idle, misbehaves or the server stops.
func (p *policyServer) serveConn(c net.Conn, counts *policyCounts, id int) {
	br := bufio.NewReaderSize(c, policyMaxLine)
	bw := bufio.NewWriterSize(c, 1024)
	pc := &policyConn{id: id, reply: make([]byte, 0, 512), logb: make([]byte, 0, 512)}
	pc.req.buf = make([]byte, 0, 512)
	pc.kb.buf = make([]byte, 0, 512)
	peer := peerOf(c)
	idleUntil := time.Time{}
	for {
		// A deadline set once per idle period, not per line: setting one
		// costs a timer update. Checked between requests only. It covers
		// writes too: a client that sends requests but never reads the
		// replies is cut off like an idle one.
		if pc.req.size > 0 {
		} else if now, idle := time.Now(), time.Duration(p.idle.Load()); now.After(idleUntil.Add(-idle / 2)) {
			idleUntil = now.Add(idle)
			if !p.conns.setDeadline(c, idleUntil) {
				return // stopping
			}
		}
		line, err := br.ReadSlice('\n')
		if err != nil {
			if errors.Is(err, bufio.ErrBufferFull) {
				p.bad(pc, counts, peer, "line too long")
			} else if len(line) > 0 || pc.req.size > 0 {
				// EOF, idle timeout or shutdown in the middle of a
				// request: nothing to answer.
				if !errors.Is(err, io.EOF) && !isTimeout(err) {
					p.bad(pc, counts, peer, "read error")
				}
			}
			return
		}
		pc.req.size += len(line)
		if pc.req.size > policyMaxRequest {
			p.bad(pc, counts, peer, "request too large")
			return
		}
		line = bytes.TrimSuffix(line[:len(line)-1], []byte{'\r'})
		if len(line) > 0 {
			pc.req.add(line)
			continue
		}
		if pc.req.size <= 2 {
			pc.req.reset() // a stray empty line between requests
			continue
		}
		pc.reply = p.decide(pc, counts, peer)
		pc.req.reset()
		if _, err := bw.Write(pc.reply); err != nil {
			return // a write timed out or failed: the client is not reading
		}
		if br.Buffered() == 0 { // the client waits: send; pipelined requests share a write
			if err := bw.Flush(); err != nil {
				return
			}
		}
		counts.replies.Add(1)
	}
}

// decide answers one complete request and returns the reply, in pc's
// buffer.
func (p *policyServer) decide(pc *policyConn, counts *policyCounts, peer string) []byte {
	counts.requests.Add(1)
	r := &pc.req
	const needed = attrRequest | attrState | attrClient | attrSender | attrRecipient
	if r.has&needed != needed || string(r.get(r.request, attrRequest)) != "smtpd_access_policy" {
		p.bad(pc, counts, peer, "missing attributes")
		return append(pc.reply[:0], "action=DUNNO\n\n"...)
	}
	state := r.get(r.state, attrState)
	if !bytes.EqualFold(state, []byte("RCPT")) && !(bytes.EqualFold(state, []byte("DATA")) && r.rcpt.end > r.rcpt.off) {
		// Asked at another stage (CONNECT, MAIL, END-OF-MESSAGE, ...):
		// there is no recipient to decide.
		p.bad(pc, counts, peer, "not at RCPT")
		return append(pc.reply[:0], "action=DUNNO\n\n"...)
	}
	client, sender, rcpt := r.get(r.client, attrClient), r.get(r.sender, attrSender), r.get(r.rcpt, attrRecipient)
	g := p.g
	v, age := g.decideRecipient(&pc.kb, g.ParseClient(client), sender, rcpt, g.clock())
	counts.verdicts[v.index()].Add(1)
	if p.dlog != nil {
		pc.logb = appendPolicyLogLine(pc.logb[:0], peer, v.Event(), client, sender, rcpt)
		p.dlog.write(pc.logb)
	}
	replies := p.replies.Load()
	out := append(pc.reply[:0], "action="...)
	switch {
	case !v.Accepts():
		left := g.Policy().MinResendDelay
		if v == GreyTooSoon {
			left -= min(age, left)
		}
		out = append(out, "DEFER_IF_PERMIT "...)
		out = replies.deferText.appendTo(out, left, rcpt)
	case v == AcceptRetried && replies.prepend:
		out = append(out, "PREPEND X-Greylist: delayed "...)
		out = strconv.AppendUint(out, uint64(age), 10)
		out = append(out, " seconds by greydaemon"...)
	default:
		out = append(out, "DUNNO"...)
	}
	return append(out, "\n\n"...)
}

// bad counts a malformed request or connection and logs it, rate-limited.
func (p *policyServer) bad(pc *policyConn, counts *policyCounts, peer, what string) {
	counts.malformed.Add(1)
	if p.dlog != nil && p.dlog.allowBad(p.g.now()) {
		r := &pc.req
		pc.logb = appendPolicyLogLine(pc.logb[:0], peer, "bad req "+what,
			r.get(r.client, attrClient), r.get(r.sender, attrSender), r.get(r.rcpt, attrRecipient))
		p.dlog.write(pc.logb)
	}
}

// appendPolicyLogLine appends a decision line for a policy request.
func appendPolicyLogLine(dst []byte, peer, event string, client, sender, rcpt []byte) []byte {
	return appendDecisionLine(dst, "postfix", peer, event, client, sender, rcpt)
}

// appendDecisionLine appends a decision line for one recipient asked by
// the front end name, in the qmail lines' format with the front end named
// first:
//
//	postfix <peer> <event> I<client> F<sender> T<recipient>
func appendDecisionLine(dst []byte, name, peer, event string, client, sender, rcpt []byte) []byte {
	dst = append(dst, name...)
	dst = append(dst, ' ')
	dst = append(dst, peer...)
	dst = append(dst, ' ')
	dst = append(dst, event...)
	dst = append(dst, " I"...)
	dst = appendEscaped(dst, client, 256)
	dst = append(dst, " F"...)
	dst = appendEscaped(dst, sender, 512)
	dst = append(dst, " T"...)
	dst = appendEscaped(dst, rcpt, 512)
	return append(dst, '\n')
}

// peerOf names a connection's peer for the log: "ip:port" for TCP, "unix"
// for a unix socket.
func peerOf(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.String()
	}
	return "unix"
}

// isTimeout reports whether err is a deadline passing.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
