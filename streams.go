package main

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// This file is what the stream front ends (Postfix's policy service,
// policy.go, and greylistd's socket, greylistdserver.go) share: accepting
// connections, a goroutine and a cap for them, deadlines, and stopping so
// that every connection finishes the request it is answering, within
// stopGrace whatever the peer does.

// stopGrace is how long a connection may take, once its front end stops,
// to take the answer it is being sent: a peer that does not read (its
// receive buffer full) does not hold up the shutdown longer than this.
const stopGrace = 2 * time.Second

// A connSet runs a stream listener's connections: at most max at once,
// each on a goroutine of its own, until close.
type connSet struct {
	max int
	// readGrace is how long a connection may go on reading once close is
	// called: 0 stops its reads at once.
	readGrace time.Duration

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	closing bool
	wg      sync.WaitGroup
}

// newConnSet returns a connSet for at most max connections at once.
func newConnSet(max int) *connSet {
	return &connSet{max: max, conns: map[net.Conn]struct{}{}}
}

// serve accepts connections on ln until close, running serveConn on each
// (which returns when the connection is done; serve then closes it), and
// atCap for one it closes at once because max are open. It returns once
// every connection is done, after removing the socket file at path, if
// any. what names the front end in log messages.
func (cs *connSet) serve(ln net.Listener, path, what string, log *logger, serveConn, atCap func(net.Conn)) {
	var failures atomic.Uint64
	for {
		c, err := ln.Accept()
		if err != nil {
			if cs.isClosing() || errors.Is(err, net.ErrClosed) {
				break
			}
			// Out of file descriptors and the like: wait a moment, and
			// do not flood the log.
			if rarely(&failures, 1) {
				log.Errorf("%s: cannot accept a connection: %v", what, err)
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if ok, full := cs.add(c); !ok {
			if full {
				atCap(c)
			}
			c.Close()
			continue
		}
		go func() {
			defer cs.wg.Done()
			serveConn(c)
			cs.mu.Lock()
			delete(cs.conns, c)
			cs.mu.Unlock()
			c.Close()
		}()
	}
	cs.wg.Wait()
	if path != "" {
		os.Remove(path)
	}
}

// add registers c, unless the set is closing or full.
func (cs *connSet) add(c net.Conn) (ok, full bool) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.closing || len(cs.conns) >= cs.max {
		return false, !cs.closing
	}
	cs.conns[c] = struct{}{}
	cs.wg.Add(1)
	return true, false
}

// isClosing reports whether close was called.
func (cs *connSet) isClosing() bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return cs.closing
}

// setDeadline sets c's read and write deadlines, unless close was called
// (whose deadlines it must not undo), and reports whether it did.
func (cs *connSet) setDeadline(c net.Conn, t time.Time) bool {
	return cs.unlessClosing(func() { c.SetDeadline(t) })
}

// setReadDeadline sets c's read deadline, unless close was called, and
// reports whether it did.
func (cs *connSet) setReadDeadline(c net.Conn, t time.Time) bool {
	return cs.unlessClosing(func() { c.SetReadDeadline(t) })
}

// unlessClosing runs set under the set's lock unless close was called, and
// reports whether it did.
func (cs *connSet) unlessClosing(set func()) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.closing {
		return false
	}
	set()
	return true
}

// close stops accepting on ln and makes every connection's reads fail at
// once (or after readGrace) and its writes within stopGrace, so that each finishes what it is
// answering and returns.
func (cs *connSet) close(ln net.Listener) error {
	cs.mu.Lock()
	cs.closing = true
	now := time.Now()
	readEnd := time.Unix(1, 0)
	if cs.readGrace > 0 {
		readEnd = now.Add(cs.readGrace)
	}
	for c := range cs.conns {
		c.SetReadDeadline(readEnd)
		c.SetWriteDeadline(now.Add(stopGrace))
	}
	cs.mu.Unlock()
	return ln.Close()
}
