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
// fixed set of reader goroutines, each owning its buffers and counters, so
// that serving a request allocates nothing and shares no cache line with
// another core. It is the daemon's qmail front end.
type server struct {
	g       *Greylister
	conns   []*net.UDPConn // bound to one address with SO_REUSEPORT when more than one
	readers int            // reader goroutines per socket
	dlog    *decisionLog   // decision lines; nil logs nothing
	log     *logger

	// allow holds the networks whose requests are answered; nil answers
	// everyone. A reload replaces it.
	allow atomic.Pointer[IPRanges]

	mu       sync.Mutex
	workers  []*worker // every reader's scratch space and counters
	started  bool      // Serve has started the readers
	stopping bool      // Close was called

	readErrors  atomic.Uint64 // failed reads other than the socket closing
	writeErrors atomic.Uint64 // replies that could not be sent
}

// workerCounts counts what one reader did. Only its reader writes them;
// UpdateStats reads them at any time.
type workerCounts struct {
	requests  atomic.Uint64 // datagrams received
	malformed atomic.Uint64 // datagrams that got no reply because they were malformed
	refused   atomic.Uint64 // datagrams from outside the allow list, dropped
	replies   atomic.Uint64 // replies sent
	verdicts  [numVerdicts]atomic.Uint64
}

// A worker is one reader goroutine's scratch space and counters.
type worker struct {
	buf    []byte // readLoop's datagram; one byte more than the largest accepted
	reply  []byte
	line   []byte
	kb     keyBuilder
	counts workerCounts
	// remote and pending are a batch's requests for the shared store and
	// their datagrams' places in the batch.
	remote  [readBatchSize]remoteRequest
	pending []int
	id      int      // its place among the server's workers; picks its log shard
	_       [64]byte // keeps the next worker's counters off this cache line
}

func newWorker() *worker {
	return &worker{
		reply: make([]byte, 0, 2),
		line:  make([]byte, 0, 512),
		kb:    keyBuilder{buf: make([]byte, 0, 512)},
	}
}

// newWorker returns a worker whose counters s reports.
func (s *server) newWorker() *worker {
	w := newWorker()
	s.mu.Lock()
	w.id = len(s.workers)
	s.workers = append(s.workers, w)
	s.mu.Unlock()
	return w
}

// Name returns the front end's name in logs and metrics.
func (s *server) Name() string { return "qmail" }

// Serve answers requests until Close is called, and returns once every
// reader has answered what it had read and the sockets are closed.
func (s *server) Serve() error {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		closeAll(s.conns)
		return nil
	}
	s.started = true
	s.mu.Unlock()
	s.serve(s.readers)
	closeAll(s.conns)
	return nil
}

// Close stops the readers: it stops reading, so that every request read
// is answered before the sockets close (Serve closes them). Requests still
// queued in the kernel are not read; their clients time out as if the
// daemon had stopped a moment sooner.
func (s *server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopping = true
	if !s.started {
		closeAll(s.conns)
		return nil
	}
	past := time.Unix(1, 0)
	for _, c := range s.conns {
		c.SetReadDeadline(past) // wakes every reader blocked in a read
	}
	return nil
}

// isStopping reports whether Close was called.
func (s *server) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}

// Addr returns the address the server answers on.
func (s *server) Addr() net.Addr { return s.conns[0].LocalAddr() }

// UpdateStats adds what the server did so far to st.
func (s *server) UpdateStats(st *FrontEndStats) {
	st.Decides = true
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.workers {
		c := &w.counts
		st.Requests += c.requests.Load()
		st.Malformed += c.malformed.Load()
		st.Refused += c.refused.Load()
		st.Replies += c.replies.Load()
		for i := range c.verdicts {
			st.Verdicts[i] += c.verdicts[i].Load()
		}
	}
	st.ReadErrors += s.readErrors.Load()
	st.WriteErrors += s.writeErrors.Load()
}

// serve runs n reader goroutines per socket until the sockets are closed,
// and returns once all of them have finished the requests they were
// handling.
func (s *server) serve(n int) {
	var wg sync.WaitGroup
	for _, conn := range s.conns {
		for range max(n, 1) {
			wg.Go(func() {
				w := s.newWorker()
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
			if errors.Is(err, net.ErrClosed) || s.isStopping() {
				return
			}
			// Nothing a client sends makes a UDP read fail; count it,
			// log it, and do not spin if it repeats.
			if rarely(&s.readErrors, 1) {
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
			if rarely(&s.writeErrors, 1) {
				s.log.Errorf("cannot send reply to %s: %v", peer, err)
			}
			continue
		}
		w.counts.replies.Add(1)
	}
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
			if errors.Is(err, net.ErrClosed) || s.isStopping() {
				return true
			}
			if rarely(&s.readErrors, 1) {
				s.log.Errorf("cannot read requests: %v", err)
			}
			time.Sleep(time.Millisecond)
			continue
		}
		if s.g.remote != nil {
			s.decideBatchRemote(w, bc, n)
		} else {
			s.decideBatch(w, bc, n)
		}
		sent, failed, err := bc.flush()
		w.counts.replies.Add(uint64(sent))
		if failed > 0 && rarely(&s.writeErrors, failed) {
			s.log.Errorf("cannot send replies: %v", err)
		}
	}
}

// decideBatch decides the n datagrams that bc read, one after another,
// and queues their replies.
func (s *server) decideBatch(w *worker, bc *batchConn, n int) {
	for i := range n {
		d, peer, ok := s.admitBatched(w, bc, i)
		if !ok {
			continue
		}
		v, err := s.g.decideQmail(&w.kb, d)
		if reply := s.answer(w, d, peer, v, err); reply != nil {
			bc.queueReply(i, reply)
		}
	}
}

// decideBatchRemote decides the n datagrams that bc read in the shared
// store, all of them in one round trip, and queues their replies. Requests
// decided without the store (a whitelisted client, a bad client field) are
// answered first.
func (s *server) decideBatchRemote(w *worker, bc *batchConn, n int) {
	pending := w.pending[:0]
	for i := range n {
		d, peer, ok := s.admitBatched(w, bc, i)
		if !ok {
			continue
		}
		v, wait, err := s.g.prepareQmailRemote(&w.kb, &w.remote[len(pending)], d)
		if wait {
			pending = append(pending, i)
			continue
		}
		if reply := s.answer(w, d, peer, v, err); reply != nil {
			bc.queueReply(i, reply)
		}
	}
	w.pending = pending
	if len(pending) == 0 {
		return
	}
	s.g.remote.decide(w.remote[:len(pending)], s.g.Policy())
	for j, i := range pending {
		d, _ := bc.datagram(i)
		v, err := s.g.finishQmailRemote(&w.kb, &w.remote[j], d)
		if reply := s.answer(w, d, bc.peer(i), v, err); reply != nil {
			bc.queueReply(i, reply)
		}
	}
}

// admitBatched returns the i'th datagram that bc read and its sender, and
// reports whether to decide it (see admit). A datagram cut short by the
// buffer is too long, hence malformed.
func (s *server) admitBatched(w *worker, bc *batchConn, i int) ([]byte, netip.AddrPort, bool) {
	d, truncated := bc.datagram(i)
	peer := bc.peer(i)
	if truncated {
		w.counts.requests.Add(1)
		if s.allowed(w, peer) {
			s.malformed(w, d, peer, "bad req too long")
		}
		return nil, peer, false
	}
	return d, peer, s.admit(w, d, peer)
}

// handle decides one datagram from peer and returns the reply to send, or
// nil for none. The reply is w's buffer.
func (s *server) handle(w *worker, datagram []byte, peer netip.AddrPort) []byte {
	if !s.admit(w, datagram, peer) {
		return nil
	}
	v, err := s.g.decideQmail(&w.kb, datagram)
	return s.answer(w, datagram, peer, v, err)
}

// admit counts a datagram from peer and reports whether to decide it: a
// datagram from outside the allow list, or longer than a request may be,
// is not decided.
func (s *server) admit(w *worker, datagram []byte, peer netip.AddrPort) bool {
	w.counts.requests.Add(1)
	if !s.allowed(w, peer) {
		return false
	}
	if len(datagram) > maxRequestSize {
		s.malformed(w, datagram[:maxRequestSize], peer, "bad req too long")
		return false
	}
	return true
}

// answer counts and logs the decision v (or err, for a malformed request)
// of datagram from peer, and returns the reply to send, or nil for none.
// The reply is w's buffer.
func (s *server) answer(w *worker, datagram []byte, peer netip.AddrPort, v Verdict, err error) []byte {
	if err != nil {
		s.malformed(w, datagram, peer, err.Error())
		return nil
	}
	w.counts.verdicts[v.index()].Add(1)
	if s.dlog != nil {
		w.line = appendLogLine(w.line[:0], peer, v.Event(), datagram)
		s.dlog.write(w.line)
	}
	w.reply = appendReply(w.reply[:0], v)
	return w.reply
}

// allowed reports whether a request from peer may be answered, and counts
// it as refused when not. Refused requests are not logged: whoever sends
// them chooses how many.
func (s *server) allowed(w *worker, peer netip.AddrPort) bool {
	if allow := s.allow.Load(); allow != nil && !allow.Contains(peer.Addr()) {
		w.counts.refused.Add(1)
		return false
	}
	return true
}

// malformed counts a malformed datagram and logs it, rate-limited.
func (s *server) malformed(w *worker, datagram []byte, peer netip.AddrPort, event string) {
	w.counts.malformed.Add(1)
	if s.dlog != nil && s.dlog.allowBad(s.g.now()) {
		w.line = appendLogLine(w.line[:0], peer, event, datagram)
		s.dlog.write(w.line)
	}
}
