package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// A decisionLog writes the per-request log lines of PROTOCOL.md §7 to
// stdout for multilog:
//
//	<peer-ip>:<peer-port> <event> <request with NULs as spaces>
//
// Lines are buffered and flushed at least once a second and on Close, so
// logging costs one short critical section per request, not a write system
// call. Lines for malformed requests are rate-limited, since anybody can send
// garbage. A decisionLog is safe for concurrent use.
type decisionLog struct {
	mu  sync.Mutex
	w   *bufio.Writer
	err error // the first write error; later lines are dropped

	// Malformed-request lines: at most badPerSecond per second.
	badSecond     int64
	badThisSecond int
	badSuppressed uint64 // since the last "not logged" line
	badDropped    uint64 // since start
}

const badPerSecond = 5

func newDecisionLog(w io.Writer) *decisionLog {
	return &decisionLog{w: bufio.NewWriterSize(w, 64<<10)}
}

// appendLogLine appends a decision line to dst: the peer, the event, the
// request with each NUL shown as a space, and a newline.
func appendLogLine(dst []byte, peer netip.AddrPort, event string, request []byte) []byte {
	dst = peer.Addr().Unmap().AppendTo(dst)
	dst = append(dst, ':')
	dst = strconv.AppendUint(dst, uint64(peer.Port()), 10)
	dst = append(dst, ' ')
	dst = append(dst, event...)
	dst = append(dst, ' ')
	for _, c := range request {
		if c == 0 || c == '\n' {
			c = ' '
		}
		dst = append(dst, c)
	}
	return append(dst, '\n')
}

// write writes one complete line.
func (l *decisionLog) write(line []byte) {
	l.mu.Lock()
	if l.err == nil {
		_, l.err = l.w.Write(line)
	}
	l.mu.Unlock()
}

// allowBad reports whether a line for a malformed request received at now
// may be logged. When a new second starts after lines were suppressed, it
// first writes a line saying how many.
func (l *decisionLog) allowBad(now time.Time) bool {
	sec := now.Unix()
	l.mu.Lock()
	defer l.mu.Unlock()
	if sec != l.badSecond {
		l.badSecond, l.badThisSecond = sec, 0
		if l.badSuppressed > 0 && l.err == nil {
			_, l.err = fmt.Fprintf(l.w, "greydaemon: %d bad requests not logged\n", l.badSuppressed)
			l.badSuppressed = 0
		}
	}
	if l.badThisSecond >= badPerSecond {
		l.badSuppressed++
		l.badDropped++
		return false
	}
	l.badThisSecond++
	return true
}

// dropped returns how many malformed-request lines were left out since
// start.
func (l *decisionLog) dropped() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.badDropped
}

// flush writes out buffered lines.
func (l *decisionLog) flush() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err == nil {
		l.err = l.w.Flush()
	}
	return l.err
}

// flushEvery flushes the log every interval until ctx is done.
func (l *decisionLog) flushEvery(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			l.flush()
		}
	}
}

// A logger writes the daemon's own messages (not decisions) to stderr as
// "greydaemon: error: ...", "greydaemon: warning: ..." and "greydaemon: ...".
type logger struct {
	mu    sync.Mutex
	w     io.Writer
	debug atomic.Bool
}

// newLogger returns a logger writing to w, with debug messages if debug.
func newLogger(w io.Writer, debug bool) *logger {
	l := &logger{w: w}
	l.debug.Store(debug)
	return l
}

// setDebug turns debug messages on or off.
func (l *logger) setDebug(on bool) { l.debug.Store(on) }

func (l *logger) printf(prefix, format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, "greydaemon: "+prefix+format+"\n", args...)
}

// Errorf logs an error.
func (l *logger) Errorf(format string, args ...any) { l.printf("error: ", format, args...) }

// Warnf logs a warning.
func (l *logger) Warnf(format string, args ...any) { l.printf("warning: ", format, args...) }

// Infof logs a notice.
func (l *logger) Infof(format string, args ...any) { l.printf("", format, args...) }

// Debugf logs a notice in debug mode only.
func (l *logger) Debugf(format string, args ...any) {
	if l.debug.Load() {
		l.printf("debug: ", format, args...)
	}
}
