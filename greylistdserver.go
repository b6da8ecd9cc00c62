package main

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// This file is the greylistd socket (greylistd.go has the protocol): a unix
// stream socket that answers one request per connection, the way Exim's
// readsocket and greylistd's greylist tool use it.

// listTimeout bounds how long a connection may take to send its request and
// read the reply. Exim's ACL gives readsocket 5 seconds.
const listTimeout = 10 * time.Second

// A listServer answers greylistd requests on one unix socket, with one
// goroutine per connection. A request is what the first read brings, up to
// 16 KB, as greylistd reads it: neither a newline nor the end of input is
// awaited (greylistd's own tool sends neither and waits for the answer).
// The reply ends without a newline, and the server closes the connection.
type listServer struct {
	book  *listBook
	ln    net.Listener
	path  string // the socket file, removed when the server stops
	log   *logger
	dlog  *decisionLog
	conns *connSet

	scratch sync.Pool // *listConn
	stripes [16]listCounts
	nextID  atomic.Uint64
}

// listCounts is one stripe of the server's counters.
type listCounts struct {
	requests, malformed, refused, replies, readErrors, writeErrors atomic.Uint64
	_                                                              [64]byte
}

// A listConn is the memory one connection works in, reused through a pool.
type listConn struct {
	buf   []byte
	req   listRequest
	reply []byte
	logb  []byte
}

// newListServer returns a server for book on ln, whose socket file is path.
func newListServer(book *listBook, ln net.Listener, path string, log *logger, dlog *decisionLog, maxConns int) *listServer {
	s := &listServer{book: book, ln: ln, path: path, log: log, dlog: dlog, conns: newConnSet(maxConns)}
	s.scratch.New = func() any {
		return &listConn{buf: make([]byte, listRequestMax), reply: make([]byte, 0, 256), logb: make([]byte, 0, 256)}
	}
	return s
}

// Name returns "greylistd".
func (s *listServer) Name() string { return "greylistd" }

// Addr returns the socket's address.
func (s *listServer) Addr() net.Addr { return s.ln.Addr() }

// Serve accepts connections until Close, then waits for the connections it
// is answering and removes the socket file.
func (s *listServer) Serve() error {
	s.conns.serve(s.ln, s.path, "greylistd", s.log, func(c net.Conn) {
		id := s.nextID.Add(1)
		s.serveConn(c, &s.stripes[id%uint64(len(s.stripes))], int(id))
	}, func(net.Conn) {
		id := s.nextID.Add(1)
		s.stripes[id%uint64(len(s.stripes))].refused.Add(1)
		if s.dlog.allowBad(s.book.g.now()) {
			s.log.Warnf("greylistd: %d connections open, the most allowed; closing a new one", s.conns.max)
		}
	})
	return nil
}

// serveConn reads one request from c, answers it and returns.
func (s *listServer) serveConn(c net.Conn, counts *listCounts, id int) {
	if !s.conns.setDeadline(c, time.Now().Add(listTimeout)) {
		return // stopping
	}
	lc := s.scratch.Get().(*listConn)
	defer s.scratch.Put(lc)
	n, err := c.Read(lc.buf)
	if err != nil && !errors.Is(err, io.EOF) {
		// A timeout, the server stopping or a reset: nobody waits for
		// an answer.
		if !isTimeout(err) {
			counts.readErrors.Add(1)
		}
		return
	}
	counts.requests.Add(1)
	perr := lc.req.parse(lc.buf[:n])
	lc.reply = s.book.answer(lc.reply[:0], &lc.req, perr)
	if len(lc.reply) > 6 && string(lc.reply[:7]) == "error: " {
		counts.malformed.Add(1)
		if s.dlog.allowBad(s.book.g.now()) {
			s.logRequest(lc, id)
		}
	} else {
		s.logRequest(lc, id)
	}
	if _, err := c.Write(lc.reply); err != nil {
		counts.writeErrors.Add(1)
		return
	}
	counts.replies.Add(1)
	if n == len(lc.buf) {
		// The request may go on. Closing with unread input would reset
		// the connection and could lose the answer: read the rest,
		// briefly, first.
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		if s.conns.setReadDeadline(c, time.Now().Add(time.Second)) {
			io.CopyN(io.Discard, c, 1<<20)
		}
	}
}

// logRequest writes the decision log line of lc's request:
//
//	greylistd <command> <reply> <data>
//
// with the reply's first line only.
func (s *listServer) logRequest(lc *listConn, id int) {
	b := append(lc.logb[:0], "greylistd "...)
	b = append(b, listCommandNames[lc.req.cmd]...)
	b = append(b, ' ')
	reply := lc.reply
	for i, c := range reply {
		if c == '\n' {
			reply = reply[:i]
			break
		}
	}
	b = appendEscaped(b, reply, 128)
	if d := lc.req.dataBytes(); len(d) > 0 {
		b = append(b, ' ')
		b = appendEscaped(b, d, 512)
	}
	lc.logb = append(b, '\n')
	s.dlog.write(lc.logb)
}

// Close stops accepting and makes every open connection stop reading.
func (s *listServer) Close() error { return s.conns.close(s.ln) }

// UpdateStats adds what the server did so far to st.
func (s *listServer) UpdateStats(st *FrontEndStats) {
	for i := range s.stripes {
		c := &s.stripes[i]
		st.Requests += c.requests.Load()
		st.Malformed += c.malformed.Load()
		st.Refused += c.refused.Load()
		st.Replies += c.replies.Load()
		st.ReadErrors += c.readErrors.Load()
		st.WriteErrors += c.writeErrors.Load()
	}
}
