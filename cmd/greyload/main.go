// Greyload is a load generator for greydaemon's qmail UDP protocol, its
// Postfix policy protocol (policy.go), greylistd's protocol for Exim
// (greylistd.go) and the milter protocol (milter.go).
//
// Usage:
//
//	greyload run  [-addr host:port] [-sockets 4] [-inflight 4] [-duration 10s] [-rate 0] [-mix 50,30,20] [-warmup 3s]
//	greyload null [-listen 127.0.0.1:2999] [-readers 0] [-batch 0]
//	greyload fill [-addr host:port] -pid PID [-n 1000000]
//
// run keeps -inflight requests in flight on each of -sockets connected UDP
// sockets for -duration (at most -rate requests a second in all, if set) and
// reports requests/s, latency percentiles and losses. Its requests mix new
// triplets, retries of triplets sent before, and requests from known IPs;
// to make IPs known it first sends one triplet per known IP, waits -warmup
// (run the server with a minimum delay below it, e.g. -m 0.02), and retries
// them. A UDP reply carries no request id, so each socket matches replies
// to its requests in order; a request with no reply within a second counts
// as lost.
//
// null answers every datagram with two fixed bytes and does nothing else:
// the baseline that shows what the machine's UDP path costs. With -batch it
// reads and answers many datagrams per system call, as greydaemon does.
//
// fill sends -n unique triplets to the server and reports the growth of the
// server's resident memory (from /proc/PID/status) per triplet.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/ipv4"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = runLoad(os.Args[2:])
	case "null":
		err = runNull(os.Args[2:])
	case "fill":
		err = runFill(os.Args[2:])
	case "policy":
		err = runPolicy(os.Args[2:])
	case "nullpolicy":
		err = runNullPolicy(os.Args[2:])
	case "greylistd":
		err = runGreylistd(os.Args[2:])
	case "nullgreylistd":
		err = runNullGreylistd(os.Args[2:])
	case "milter":
		err = runMilter(os.Args[2:])
	case "nullmilter":
		err = runNullMilter(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "greyload: error: %v\n", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: greyload run|null|fill|policy|nullpolicy|greylistd|nullgreylistd|milter|nullmilter [flags]   (greyload CMD -h for flags)")
	os.Exit(2)
}

// request builds a qmail request datagram.
func request(dst []byte, ip, sender, rcpt string) []byte {
	dst = append(dst[:0], 'I')
	dst = append(dst, ip...)
	dst = append(dst, 0, 'F')
	dst = append(dst, sender...)
	dst = append(dst, 0, 'T')
	dst = append(dst, rcpt...)
	return append(dst, 0)
}

// stats collects one socket's results.
type stats struct {
	sent, received, lost uint64
	latencies            []time.Duration
}

func runLoad(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:1999", "server address")
	sockets := fs.Int("sockets", 4, "connected UDP sockets")
	inflight := fs.Int("inflight", 4, "requests in flight per socket")
	duration := fs.Duration("duration", 10*time.Second, "how long to send")
	rate := fs.Float64("rate", 0, "requests per second in all (0: as fast as replies come)")
	mix := fs.String("mix", "50,30,20", "percent new triplets, retries, known IPs")
	warmup := fs.Duration("warmup", 3*time.Second, "wait between making IPs known and retrying (above the server's -m)")
	knownIPs := fs.Int("known", 1000, "IPs to make known before the run")
	fs.Parse(args)
	var pNew, pRetry, pKnown int
	if _, err := fmt.Sscanf(*mix, "%d,%d,%d", &pNew, &pRetry, &pKnown); err != nil || pNew+pRetry+pKnown != 100 {
		return fmt.Errorf("bad -mix %q: want three percentages adding up to 100", *mix)
	}
	raddr, err := net.ResolveUDPAddr("udp", *addr)
	if err != nil {
		return err
	}
	runID := time.Now().UnixNano() % 1_000_000

	if pKnown > 0 {
		if err := makeKnown(raddr, *knownIPs, runID, *warmup); err != nil {
			return err
		}
	}

	var wg sync.WaitGroup
	results := make([]*stats, *sockets)
	start := time.Now()
	deadline := start.Add(*duration)
	for s := range *sockets {
		conn, err := net.DialUDP("udp", nil, raddr)
		if err != nil {
			return err
		}
		st := &stats{latencies: make([]time.Duration, 0, 1<<20)}
		results[s] = st
		var interval time.Duration
		if *rate > 0 {
			interval = time.Duration(float64(time.Second) * float64(*sockets) / *rate)
		}
		conn.SetReadBuffer(1 << 20)
		wg.Go(func() {
			defer conn.Close()
			loadSocket(conn, st, s, runID, *inflight, deadline, interval, pNew, pRetry, *knownIPs)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all stats
	for _, st := range results {
		all.sent += st.sent
		all.received += st.received
		all.lost += st.lost
		all.latencies = append(all.latencies, st.latencies...)
	}
	slices.Sort(all.latencies)
	pct := func(p float64) time.Duration {
		if len(all.latencies) == 0 {
			return 0
		}
		return all.latencies[min(len(all.latencies)-1, int(p*float64(len(all.latencies))))]
	}
	fmt.Printf("requests/s %.0f  sent %d  received %d  lost %d  p50 %v  p99 %v  p99.9 %v  max %v\n",
		float64(all.received)/min(elapsed, *duration).Seconds(), all.sent, all.received, all.lost,
		pct(0.5), pct(0.99), pct(0.999), pct(1))
	return nil
}

// makeKnown makes n IPs known to the server: one triplet each, a wait, and
// a retry.
func makeKnown(raddr *net.UDPAddr, n int, runID int64, wait time.Duration) error {
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		return err
	}
	defer conn.Close()
	buf := make([]byte, 16)
	var d []byte
	send := func(i int) error {
		d = request(d, knownIP(i), "warm@load.example", fmt.Sprintf("warm%d@load.example", runID))
		for try := 0; try < 3; try++ {
			conn.Write(d)
			conn.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := conn.Read(buf); err == nil {
				return nil
			}
		}
		return fmt.Errorf("no reply from %s while warming up", raddr)
	}
	for i := range n {
		if err := send(i); err != nil {
			return err
		}
	}
	time.Sleep(wait)
	for i := range n {
		if err := send(i); err != nil {
			return err
		}
	}
	return nil
}

func knownIP(i int) string { return fmt.Sprintf("10.200.%d.%d", i/250, 1+i%250) }

// loadSocket runs one socket's share of the load until deadline, in one
// goroutine: it sends while fewer than inflight requests are unanswered
// (and, with a rate, when the next send is due), and otherwise waits for a
// reply, never longer than until the next send is due.
func loadSocket(conn *net.UDPConn, st *stats, sock int, runID int64, inflight int, deadline time.Time, interval time.Duration, pNew, pRetry, nKnown int) {
	g := newGenerator(sock, runID, pNew, pRetry, nKnown)
	pending := make([]time.Time, 0, inflight) // send times, oldest first
	buf := make([]byte, 16)
	now := time.Now()
	nextSend, lastReply := now, now
	for {
		sending := now.Before(deadline)
		if !sending && len(pending) == 0 {
			return
		}
		if sending && len(pending) < inflight && !now.Before(nextSend) {
			pending = append(pending, now)
			st.sent++
			conn.Write(g.next())
			if interval > 0 {
				nextSend = nextSend.Add(interval)
				if nextSend.Before(now.Add(-time.Second)) {
					nextSend = now // fell far behind: do not burst to catch up
				}
			}
			now = time.Now()
			continue
		}
		wait := now.Add(time.Second)
		if sending && len(pending) < inflight && nextSend.Before(wait) {
			wait = nextSend
		}
		conn.SetReadDeadline(wait)
		_, err := conn.Read(buf)
		now = time.Now()
		if err != nil {
			if len(pending) > 0 && now.Sub(lastReply) >= time.Second {
				st.lost += uint64(len(pending)) // unanswered for a second
				pending = pending[:0]
				lastReply = now
			}
			continue
		}
		lastReply = now
		if len(pending) > 0 {
			st.latencies = append(st.latencies, now.Sub(pending[0]))
			pending = append(pending[:0], pending[1:]...)
			st.received++
		}
	}
}

// A generator makes the request mix without allocating: new triplets get a
// fresh counter, retries reuse a recent one, known-IP requests cycle over
// the IPs made known.
type generator struct {
	sock                 int
	runID                string
	pNew, pRetry, nKnown int
	i                    int
	counter              uint64
	d                    []byte
}

func newGenerator(sock int, runID int64, pNew, pRetry, nKnown int) *generator {
	return &generator{sock: sock, runID: strconv.FormatInt(runID, 10), pNew: pNew, pRetry: pRetry, nKnown: max(nKnown, 1)}
}

func (g *generator) next() []byte {
	g.i++
	r := g.i % 100
	if r >= g.pNew+g.pRetry {
		k := g.i % g.nKnown
		g.d = append(g.d[:0], "I10.200."...)
		g.d = strconv.AppendInt(g.d, int64(k/250), 10)
		g.d = append(g.d, '.')
		g.d = strconv.AppendInt(g.d, int64(1+k%250), 10)
		g.d = append(g.d, "\x00Fload@sender.example\x00Tk@rcpt.example\x00"...)
		return g.d
	}
	c := g.counter
	if r < g.pNew {
		g.counter++
		c = g.counter
	} else if c > 0 {
		c -= uint64(g.i%50) % c
	}
	g.d = append(g.d[:0], "I192.0."...)
	g.d = strconv.AppendInt(g.d, int64(g.sock), 10)
	g.d = append(g.d, '.')
	g.d = strconv.AppendUint(g.d, c%250, 10)
	g.d = append(g.d, "\x00Fload@sender.example\x00Tu"...)
	g.d = strconv.AppendUint(g.d, c, 10)
	g.d = append(g.d, '-')
	g.d = append(g.d, g.runID...)
	g.d = append(g.d, "@rcpt.example\x00"...)
	return g.d
}

func runNull(args []string) error {
	fs := flag.NewFlagSet("null", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:2999", "address to answer on")
	readers := fs.Int("readers", 0, "reader goroutines (0: max(2, GOMAXPROCS))")
	batch := fs.Int("batch", 0, "read and answer up to this many datagrams per system call (recvmmsg/sendmmsg)")
	fs.Parse(args)
	laddr, err := net.ResolveUDPAddr("udp", *listen)
	if err != nil {
		return err
	}
	conn, err := net.ListenUDP("udp", laddr)
	if err != nil {
		return err
	}
	conn.SetReadBuffer(4 << 20)
	fmt.Fprintf(os.Stderr, "greyload: null responder on %s\n", conn.LocalAddr())
	serveNull(conn, *readers, *batch)
	return nil
}

// serveNull answers every datagram on conn with two fixed bytes until conn
// is closed.
func serveNull(conn *net.UDPConn, readers, batch int) {
	if readers == 0 {
		readers = max(2, runtime.GOMAXPROCS(0))
	}
	var wg sync.WaitGroup
	for range readers {
		if batch > 0 {
			wg.Go(func() { nullBatch(conn, batch) })
			continue
		}
		wg.Go(func() {
			buf := make([]byte, 65536)
			reply := []byte{1, 3}
			for {
				_, peer, err := conn.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				conn.WriteToUDPAddrPort(reply, peer)
			}
		})
	}
	wg.Wait()
}

// nullBatch answers datagrams in batches with golang.org/x/net's
// ReadBatch and WriteBatch.
func nullBatch(conn *net.UDPConn, size int) {
	pc := ipv4.NewPacketConn(conn)
	in := make([]ipv4.Message, size)
	out := make([]ipv4.Message, size)
	reply := []byte{1, 3}
	for i := range in {
		in[i].Buffers = [][]byte{make([]byte, 65536)}
		out[i].Buffers = [][]byte{reply}
	}
	for {
		n, err := pc.ReadBatch(in, 0)
		if err != nil {
			return
		}
		for i := range n {
			out[i].Addr = in[i].Addr
		}
		for sent := 0; sent < n; {
			k, err := pc.WriteBatch(out[sent:n], 0)
			if err != nil {
				break
			}
			sent += k
		}
	}
}

func runFill(args []string) error {
	fs := flag.NewFlagSet("fill", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:1999", "server address")
	n := fs.Int("n", 1_000_000, "unique triplets to send")
	pid := fs.Int("pid", 0, "server process id, to read its resident memory")
	fs.Parse(args)
	if *pid == 0 {
		return fmt.Errorf("fill needs -pid")
	}
	raddr, err := net.ResolveUDPAddr("udp", *addr)
	if err != nil {
		return err
	}
	before, err := rss(*pid)
	if err != nil {
		return err
	}
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		return err
	}
	defer conn.Close()
	runID := time.Now().UnixNano() % 1_000_000
	const window = 32
	buf := make([]byte, 16)
	var d []byte
	lost := 0
	start := time.Now()
	for i := 0; i < *n; {
		batch := min(window, *n-i)
		for j := range batch {
			k := i + j
			d = request(d, fmt.Sprintf("172.%d.%d.%d", 16+k>>16&15, k>>8&255, k&255), "fill@sender.example",
				fmt.Sprintf("f%d-%d@rcpt.example", k, runID))
			conn.Write(d)
		}
		for range batch {
			conn.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := conn.Read(buf); err != nil {
				lost++
			}
		}
		i += batch
	}
	elapsed := time.Since(start)
	time.Sleep(2 * time.Second) // let the server settle
	after, err := rss(*pid)
	if err != nil {
		return err
	}
	fmt.Printf("sent %d triplets in %v (%d unanswered); server RSS %d -> %d KiB: %.1f bytes per triplet\n",
		*n, elapsed.Round(time.Millisecond), lost, before/1024, after/1024, float64(after-before)/float64(*n))
	return nil
}

// rss returns the resident memory of process pid in bytes.
func rss(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("cannot read the server's memory: %w", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
