package main

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// A server answers qmail greylisting requests on its UDP sockets with a
// fixed set of reader goroutines, each owning its buffers, so that serving a
// request allocates nothing.
type server struct {
	g     *Greylister
	conns []*net.UDPConn // bound to one address with SO_REUSEPORT when more than one
	dlog  *decisionLog   // decision lines; nil logs nothing
	log   *logger

	stats serverStats
}

// serverStats counts what the server did. The counters are updated
// atomically.
type serverStats struct {
	requests    atomic.Uint64 // datagrams received
	malformed   atomic.Uint64 // datagrams that got no reply
	replies     atomic.Uint64 // replies sent
	writeErrors atomic.Uint64 // replies that could not be sent
	readErrors  atomic.Uint64 // failed reads other than the socket closing
}

// A worker is one reader goroutine's scratch space.
type worker struct {
	buf   []byte // readLoop's datagram; one byte more than the largest accepted
	reply []byte
	line  []byte
	kb    keyBuilder
}

func newWorker() *worker {
	return &worker{
		reply: make([]byte, 0, 2),
		line:  make([]byte, 0, 512),
		kb:    keyBuilder{buf: make([]byte, 0, 512)},
	}
}

// serve runs n reader goroutines per socket until the sockets are closed,
// and returns once all of them have finished the requests they were
// handling.
func (s *server) serve(n int) {
	var wg sync.WaitGroup
	for _, conn := range s.conns {
		for range max(n, 1) {
			wg.Go(func() {
				w := newWorker()
				if !s.readLoopBatch(w, conn) {
					s.readLoop(w, conn)
				}
			})
		}
	}
	wg.Wait()
}

// readLoop reads and answers datagrams one system call at a time until
// the socket is closed. It serves where batched I/O is not available.
func (s *server) readLoop(w *worker, conn *net.UDPConn) {
	w.buf = make([]byte, maxRequestSize+1)
	for {
		n, peer, err := conn.ReadFromUDPAddrPort(w.buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Nothing a client sends makes a UDP read fail; count it,
			// log it, and do not spin if it repeats.
			if rarely(&s.stats.readErrors, 1) {
				s.log.Errorf("cannot read request: %v", err)
			}
			time.Sleep(time.Millisecond)
			continue
		}
		reply := s.handle(w, w.buf[:n], peer)
		if reply == nil {
			continue
		}
		if _, err := conn.WriteToUDPAddrPort(reply, peer); err != nil {
			if rarely(&s.stats.writeErrors, 1) {
				s.log.Errorf("cannot send reply to %s: %v", peer, err)
			}
			continue
		}
		s.stats.replies.Add(1)
	}
}

// rarely adds n to an error counter and reports whether the error should
// be logged: the first time, and then once per thousand, so that a
// persistent fault does not flood the log.
func rarely(counter *atomic.Uint64, n int) bool {
	after := counter.Add(uint64(n))
	before := after - uint64(n)
	return before == 0 || before/1000 != after/1000
}

// readBatchSize is how many datagrams one recvmmsg call may return. Under
// load it cuts system calls by about that factor; with one request at a
// time it costs nothing, since recvmmsg returns what is queued.
const readBatchSize = 16

// readLoopBatch reads and answers datagrams in batches until the socket is
// closed. It returns false at once if batched I/O is not available, so that
// the caller falls back to readLoop.
func (s *server) readLoopBatch(w *worker, conn *net.UDPConn) bool {
	bc, err := newBatchConn(conn, readBatchSize, maxRequestSize+1)
	if err != nil {
		return false
	}
	for {
		n, err := bc.read()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return true
			}
			if rarely(&s.stats.readErrors, 1) {
				s.log.Errorf("cannot read requests: %v", err)
			}
			time.Sleep(time.Millisecond)
			continue
		}
		for i := range n {
			d, truncated := bc.datagram(i)
			peer := bc.peer(i)
			if truncated {
				s.stats.requests.Add(1)
				s.malformed(w, d, peer, "bad req too long")
				continue
			}
			if reply := s.handle(w, d, peer); reply != nil {
				bc.queueReply(i, reply)
			}
		}
		sent, failed, err := bc.flush()
		s.stats.replies.Add(uint64(sent))
		if failed > 0 && rarely(&s.stats.writeErrors, failed) {
			s.log.Errorf("cannot send replies: %v", err)
		}
	}
}

// handle decides one datagram from peer and returns the reply to send, or
// nil for none. The reply is w's buffer.
func (s *server) handle(w *worker, datagram []byte, peer netip.AddrPort) []byte {
	s.stats.requests.Add(1)
	if len(datagram) > maxRequestSize {
		s.malformed(w, datagram[:maxRequestSize], peer, "bad req too long")
		return nil
	}
	v, err := s.g.decideQmail(&w.kb, datagram)
	if err != nil {
		s.malformed(w, datagram, peer, err.Error())
		return nil
	}
	if s.dlog != nil {
		w.line = appendLogLine(w.line[:0], peer, v.Event(), datagram)
		s.dlog.write(w.line)
	}
	w.reply = appendReply(w.reply[:0], v)
	return w.reply
}

// malformed counts a malformed datagram and logs it, rate-limited.
func (s *server) malformed(w *worker, datagram []byte, peer netip.AddrPort, event string) {
	s.stats.malformed.Add(1)
	if s.dlog != nil && s.dlog.allowBad(s.g.now()) {
		w.line = appendLogLine(w.line[:0], peer, event, datagram)
		s.dlog.write(w.line)
	}
}
