package main

import (
	"bytes"
	"errors"
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
// Each line goes into one queue (a lossySink) in the order the decisions
// were made, and a writer goroutine writes it out at once: a request costs
// a short critical section, not a write system call, and a log reader that
// stops reading costs dropped lines, never a delayed answer. Lines for
// malformed requests are rate-limited, since anybody can send garbage. A
// decisionLog is safe for concurrent use.
type decisionLog struct {
	sink *lossySink

	mu sync.Mutex // the malformed-line limit
	// Malformed-request lines: at most badPerSecond per second.
	badSecond     int64
	badThisSecond int
	badSuppressed uint64 // since the last "not logged" line
	badDropped    uint64 // since start
}

const badPerSecond = 5

// newDecisionLog returns a decisionLog writing to w, through w itself if
// it is a lossySink, else through a new one.
func newDecisionLog(w io.Writer) *decisionLog {
	sink, ok := w.(*lossySink)
	if !ok {
		sink = newLossySink(w, "stdout")
	}
	return &decisionLog{sink: sink}
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

// write writes one complete line.
func (l *decisionLog) write(line []byte) { l.sink.Write(line) }

// allowBad reports whether a line for a malformed request received at now
// may be logged. When a new second starts after lines were suppressed, it
// first writes a line saying how many.
func (l *decisionLog) allowBad(now time.Time) bool {
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
		l.write(append(b, " bad requests not logged\n"...))
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

// flush waits, at most logFlushTimeout, until the lines written so far
// are out.
func (l *decisionLog) flush() { l.sink.flush(logFlushTimeout) }

// rarely adds n to an error counter and reports whether the error should
// be logged: the first time, and then once per thousand, so that a
// persistent fault does not flood the log.
func rarely(counter *atomic.Uint64, n int) bool {
	after := counter.Add(uint64(n))
	before := after - uint64(n)
	return before == 0 || before/1000 != after/1000
}

// A lossySink writes to a stream that may stop working (a closed pipe, a
// full disk, a log reader that went away or stopped reading) without ever
// failing or delaying its caller. Write queues whole lines; a goroutine of
// the sink's own writes them out as soon as it can, many at once when they
// come fast. What cannot be written, and what does not fit in the queue
// (lossyQueueLimit bytes) while the stream is stuck, is dropped and counted
// by lines; the first loss and every thousandth after it are reported
// through report, and the daemon keeps serving. A lossySink is safe for
// concurrent use.
type lossySink struct {
	w        io.Writer
	name     string        // "stdout" or "stderr", for reports and metrics
	lost     atomic.Uint64 // lines that could not be written
	failures atomic.Uint64 // failed writes and overflows
	// report, if set, is told of a loss; it must not write to this sink.
	report func(s *lossySink, err error)

	mu      sync.Mutex
	pending []byte        // lines waiting for the writer
	spare   []byte        // the buffer the writer last wrote, for reuse
	writing bool          // the writer holds lines it has not written
	wake    chan struct{} // tells the writer that lines wait
	written chan struct{} // closed after the next write, when a flush waits
}

// lossyQueueLimit is how many bytes of lines wait for a stream that is not
// read (about 10,000 ordinary decision lines) before new ones are dropped.
const lossyQueueLimit = 1 << 20

// lossyBufferSize is the size of each of a lossySink's two buffers at
// start, enough for the lines that arrive during one write, so that
// serving does not allocate.
const lossyBufferSize = 64 << 10

// logFlushTimeout is how long a flush, as at shutdown, waits for a stream
// to take what is queued: a stuck log reader delays the exit this long at
// most.
const logFlushTimeout = 2 * time.Second

// errQueueFull is what a report says when lines were dropped because the
// stream did not take them.
var errQueueFull = errors.New("the reader is not reading; the queue of lines is full")

// newLossySink returns a lossySink writing to w, with its writer running.
func newLossySink(w io.Writer, name string) *lossySink {
	s := &lossySink{w: w, name: name, wake: make(chan struct{}, 1),
		pending: make([]byte, 0, lossyBufferSize), spare: make([]byte, 0, lossyBufferSize)}
	go s.writeLoop()
	return s
}

// Write queues p, which holds whole lines, and always reports success.
func (s *lossySink) Write(p []byte) (int, error) {
	s.mu.Lock()
	if len(s.pending)+len(p) > lossyQueueLimit {
		s.mu.Unlock()
		s.drop(p, errQueueFull)
		return len(p), nil
	}
	s.pending = append(s.pending, p...)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default: // the writer has been told already
	}
	return len(p), nil
}

// drop counts the lines of p as lost and reports it, rarely.
func (s *lossySink) drop(p []byte, err error) {
	s.lost.Add(uint64(max(bytes.Count(p, []byte{'\n'}), 1)))
	if rarely(&s.failures, 1) && s.report != nil {
		s.report(s, err)
	}
}

// writeLoop writes what is queued whenever there is some. A write that
// blocks holds up only this goroutine.
func (s *lossySink) writeLoop() {
	for range s.wake {
		s.mu.Lock()
		buf := s.pending
		s.pending, s.writing = s.spare[:0], true
		s.mu.Unlock()
		if len(buf) > 0 {
			if n, err := s.w.Write(buf); err != nil {
				s.drop(buf[min(max(n, 0), len(buf)):], err)
			}
		}
		s.mu.Lock()
		s.spare, s.writing = buf[:0], false
		if s.written != nil {
			close(s.written)
			s.written = nil
		}
		s.mu.Unlock()
	}
}

// flush waits until everything queued before it was written (or dropped),
// at most timeout. It returns false if the stream did not take it in time;
// what is still queued then counts as lost.
func (s *lossySink) flush(timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		if len(s.pending) == 0 && !s.writing {
			s.mu.Unlock()
			return true
		}
		if s.written == nil {
			s.written = make(chan struct{})
		}
		written := s.written
		s.mu.Unlock()
		select {
		case s.wake <- struct{}{}:
		default:
		}
		select {
		case <-written:
		case <-timer.C:
			s.mu.Lock()
			stuck := s.pending
			s.pending = nil
			s.mu.Unlock()
			if len(stuck) > 0 {
				s.lost.Add(uint64(max(bytes.Count(stuck, []byte{'\n'}), 1)))
			}
			return false
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
