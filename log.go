package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// A decisionLog writes the per-request log lines of PROTOCOL.md §7 to
// stdout for multilog:
//
//	<peer-ip>:<peer-port> <event> <request with NULs as spaces>
//
// Lines are buffered and flushed at least once a second and at shutdown,
// so logging costs a short critical section per request, not a write
// system call. The buffer is split in logShards parts, each with its own
// lock, and each reader or connection writes to one of them, so that many
// connections do not queue on one lock; lines stay whole, and one
// connection's lines stay in order. Lines for malformed requests are
// rate-limited, since anybody can send garbage. A decisionLog is safe for
// concurrent use. It writes to a lossySink, so a stdout that cannot be
// written never stops it.
type decisionLog struct {
	mu     sync.Mutex // the writer and the malformed-line limit
	w      io.Writer
	shards [logShards]logShard

	// Malformed-request lines: at most badPerSecond per second.
	badSecond     int64
	badThisSecond int
	badSuppressed uint64 // since the last "not logged" line
	badDropped    uint64 // since start
}

// logShards is how many parts a decisionLog's buffer has.
const logShards = 16

// A logShard is one part of a decisionLog's buffer.
type logShard struct {
	mu  sync.Mutex
	buf []byte
	_   [40]byte // keeps two shards' locks off one cache line
}

const badPerSecond = 5

// logShardSize is each shard's buffer: lines are written out when it is
// full, or by the once-a-second flush.
const logShardSize = 16 << 10

func newDecisionLog(w io.Writer) *decisionLog {
	l := &decisionLog{w: w}
	for i := range l.shards {
		l.shards[i].buf = make([]byte, 0, logShardSize)
	}
	return l
}

// maxLoggedRequest is how much of a request a log line shows. Ordinary
// requests are far shorter; a longer one is cut, and the line says by how
// much, so that one line stays one line and a flood of large datagrams
// cannot fill the disk sixty times faster than a flood of small ones.
const maxLoggedRequest = 1024

// appendLogLine appends a decision line to dst: the peer, the event, the
// request with each NUL shown as a space and every other control byte (and
// any byte that is not valid UTF-8) escaped as \xNN, cut at
// maxLoggedRequest bytes, and a newline. A request of printable text, as
// every real one is, appears as the Perl daemon wrote it; no request can
// start a line of its own or send a terminal escape.
func appendLogLine(dst []byte, peer netip.AddrPort, event string, request []byte) []byte {
	dst = peer.Addr().Unmap().AppendTo(dst)
	dst = append(dst, ':')
	dst = strconv.AppendUint(dst, uint64(peer.Port()), 10)
	dst = append(dst, ' ')
	dst = append(dst, event...)
	dst = append(dst, ' ')
	dst = appendShown(dst, request, maxLoggedRequest, true)
	return append(dst, '\n')
}

// appendEscaped appends b to dst as appendLogLine shows a request, NUL
// escaped too, cut at limit bytes.
func appendEscaped(dst, b []byte, limit int) []byte {
	return appendShown(dst, b, limit, false)
}

// appendShown appends b to dst with control bytes (NUL as a space when
// nulAsSpace) and bytes that are not valid UTF-8 escaped as \xNN, cut at
// limit bytes with a note of how many more there were.
func appendShown(dst, b []byte, limit int, nulAsSpace bool) []byte {
	shown := b[:min(len(b), limit)]
	for len(shown) > 0 {
		// Printable ASCII, all of an ordinary request, is copied in runs.
		n := 0
		for n < len(shown) && shown[n] >= 0x20 && shown[n] < 0x7f {
			n++
		}
		dst = append(dst, shown[:n]...)
		if shown = shown[n:]; len(shown) == 0 {
			break
		}
		c := shown[0]
		switch {
		case c == 0 && nulAsSpace:
			dst = append(dst, ' ')
		case c < 0x20 || c == 0x7f:
			dst = appendHexEscape(dst, c)
		case c < utf8.RuneSelf:
			dst = append(dst, c)
		default:
			r, size := utf8.DecodeRune(shown)
			if r == utf8.RuneError || r < 0xa0 { // invalid, or a C1 control such as CSI
				dst = appendHexEscape(dst, c)
				size = 1
			} else {
				dst = append(dst, shown[:size]...)
			}
			shown = shown[size:]
			continue
		}
		shown = shown[1:]
	}
	if cut := len(b) - limit; cut > 0 {
		dst = append(dst, " ...["...)
		dst = strconv.AppendInt(dst, int64(cut), 10)
		dst = append(dst, " more bytes]"...)
	}
	return dst
}

// appendHexEscape appends \xNN for c.
func appendHexEscape(dst []byte, c byte) []byte {
	const hex = "0123456789abcdef"
	return append(dst, '\\', 'x', hex[c>>4], hex[c&15])
}

// write writes one complete line through shard (any number; each writer
// keeps to one).
func (l *decisionLog) write(shard int, line []byte) {
	s := &l.shards[uint(shard)%logShards]
	s.mu.Lock()
	if len(s.buf)+len(line) > cap(s.buf) {
		l.writeOut(s.buf)
		s.buf = s.buf[:0]
	}
	if len(line) > cap(s.buf) {
		l.writeOut(line) // a line larger than a buffer: cannot happen with bounded lines
	} else {
		s.buf = append(s.buf, line...)
	}
	s.mu.Unlock()
}

// writeOut writes whole lines to the writer.
func (l *decisionLog) writeOut(b []byte) {
	l.mu.Lock()
	l.w.Write(b)
	l.mu.Unlock()
}

// allowBad reports whether a line for a malformed request received at now
// may be logged, through shard. When a new second starts after lines were
// suppressed, it first writes a line saying how many, through the same
// shard, so that it follows the lines it counts.
func (l *decisionLog) allowBad(shard int, now time.Time) bool {
	sec := now.Unix()
	l.mu.Lock()
	var suppressed uint64
	if sec != l.badSecond {
		l.badSecond, l.badThisSecond = sec, 0
		suppressed, l.badSuppressed = l.badSuppressed, 0
	}
	ok := l.badThisSecond < badPerSecond
	if ok {
		l.badThisSecond++
	} else {
		l.badSuppressed++
		l.badDropped++
	}
	l.mu.Unlock()
	if suppressed > 0 {
		var line [64]byte
		b := append(line[:0], "greydaemon: "...)
		b = strconv.AppendUint(b, suppressed, 10)
		l.write(shard, append(b, " bad requests not logged\n"...))
	}
	return ok
}

// dropped returns how many malformed-request lines were left out since
// start.
func (l *decisionLog) dropped() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.badDropped
}

// flush writes out buffered lines.
func (l *decisionLog) flush() {
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		if len(s.buf) > 0 {
			l.writeOut(s.buf)
			s.buf = s.buf[:0]
		}
		s.mu.Unlock()
	}
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

// rarely adds n to an error counter and reports whether the error should
// be logged: the first time, and then once per thousand, so that a
// persistent fault does not flood the log.
func rarely(counter *atomic.Uint64, n int) bool {
	after := counter.Add(uint64(n))
	before := after - uint64(n)
	return before == 0 || before/1000 != after/1000
}

// A lossySink writes to a stream that may stop working (a closed pipe, a
// full disk, a log reader that went away) without ever failing its caller:
// what cannot be written is dropped and counted by lines, the first failure
// and every thousandth after it are reported through report, and the
// daemon keeps serving. A lossySink is safe for concurrent use when its
// writer is.
type lossySink struct {
	w        io.Writer
	name     string        // "stdout" or "stderr", for reports and metrics
	lost     atomic.Uint64 // lines that could not be written
	failures atomic.Uint64 // failed writes
	// report, if set, is told of a failure; it must not write to this
	// sink.
	report func(s *lossySink, err error)
}

// Write writes p and always reports success.
func (s *lossySink) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if err != nil {
		s.lost.Add(uint64(max(bytes.Count(p[n:], []byte{'\n'}), 1)))
		if rarely(&s.failures, 1) && s.report != nil {
			s.report(s, err)
		}
	}
	return len(p), nil
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
