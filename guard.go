package main

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// A guardedListener is a TCP listener that closes at once every connection
// from outside its allow list and every connection beyond its cap, so that
// an endpoint served by a library (net/http, for metrics) neither answers
// strangers nor lets them use up the process's file descriptors.
type guardedListener struct {
	net.Listener
	allow   atomic.Pointer[IPRanges] // nil: all
	slots   chan struct{}            // one per open connection
	refused atomic.Uint64            // closed for the allow list
	atCap   atomic.Uint64            // closed for the cap
}

// newGuardedListener returns ln guarded, with at most max connections open.
func newGuardedListener(ln net.Listener, max int) *guardedListener {
	return &guardedListener{Listener: ln, slots: make(chan struct{}, max)}
}

// Accept returns the next connection that is allowed and fits the cap.
func (l *guardedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if !l.allowed(c.RemoteAddr()) {
			l.refused.Add(1)
			c.Close()
			continue
		}
		select {
		case l.slots <- struct{}{}:
			return &guardedConn{Conn: c, slots: l.slots}, nil
		default:
			l.atCap.Add(1)
			c.Close()
		}
	}
}

// allowed reports whether the allow list admits addr.
func (l *guardedListener) allowed(addr net.Addr) bool { return peerAllowed(l.allow.Load(), addr) }

// peerAllowed reports whether the allow list allow (nil: everyone) admits
// a stream peer at addr; a unix socket's peers are always admitted.
func peerAllowed(allow *IPRanges, addr net.Addr) bool {
	a, ok := addr.(*net.TCPAddr)
	if allow == nil || !ok {
		return true
	}
	ip, _ := netip.AddrFromSlice(a.IP)
	return allow.Contains(ip.Unmap())
}

// A guardedConn gives its slot back when it is closed.
type guardedConn struct {
	net.Conn
	slots chan struct{}
	once  sync.Once
}

// Close closes the connection and frees its slot, once.
func (c *guardedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { <-c.slots })
	return err
}
