package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// This file is greyload's Postfix side:
//
//	greyload policy     [-addr 127.0.0.1:10023 | -addr unix:/path] [-conns 16] [-duration 10s] [-new 50]
//	greyload nullpolicy [-listen 127.0.0.1:10024]
//
// policy keeps -conns connections with one request in flight each, as
// Postfix's smtpd processes do, for -duration, and reports requests/s and
// latency percentiles. -new percent of the requests are new triplets; the
// rest repeat a triplet of the same connection (retries).
//
// nullpolicy answers every policy request with action=DUNNO and does
// nothing else: the baseline that shows what the machine's TCP path costs.

// policyRequest appends a Postfix policy request for one recipient.
func policyRequest(dst []byte, client, sender, rcpt string) []byte {
	dst = append(dst[:0], "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address="...)
	dst = append(dst, client...)
	dst = append(dst, "\nclient_name=unknown\nhelo_name=load.example\nsender="...)
	dst = append(dst, sender...)
	dst = append(dst, "\nrecipient="...)
	dst = append(dst, rcpt...)
	dst = append(dst, "\nrecipient_count=0\nqueue_id=\ninstance=1.2.3\nsize=0\n\n"...)
	return dst
}

// dialSpec dials "host:port" over TCP or "unix:/path".
func dialSpec(spec string) (net.Conn, error) {
	if path, ok := strings.CutPrefix(spec, "unix:"); ok {
		return net.Dial("unix", path)
	}
	return net.Dial("tcp", spec)
}

func runPolicy(args []string) error {
	fs := flag.NewFlagSet("policy", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:10023", "policy server: host:port or unix:/path")
	conns := fs.Int("conns", 16, "connections, one request in flight each")
	duration := fs.Duration("duration", 10*time.Second, "how long to send")
	pNew := fs.Int("new", 50, "percent of requests that are new triplets")
	fs.Parse(args)
	runID := strconv.FormatInt(time.Now().UnixNano()%1_000_000, 10)
	return runLoops(*conns, *duration, *pNew, func(c int) (loop, error) {
		conn, err := dialSpec(*addr)
		if err != nil {
			return loop{}, err
		}
		r := bufio.NewReader(conn)
		var d []byte
		return loop{
			build: func(k int) {
				d = policyRequest(d, fmt.Sprintf("10.%d.%d.1", c, k%200), "load@sender.example",
					"r"+strconv.Itoa(k)+"-"+runID+"@rcpt.example")
			},
			ask: func() error {
				if _, err := conn.Write(d); err != nil {
					return err
				}
				for {
					line, err := r.ReadSlice('\n')
					if err != nil {
						return err
					}
					if len(line) == 1 {
						return nil
					}
				}
			},
			done: func() { conn.Close() },
		}, nil
	}, func() string { return "" })
}

// A loop is one load loop's requests: build makes the request for key k,
// ask sends it and waits for its answer (the part that is timed), and
// done, if set, releases what the loop holds.
type loop struct {
	build func(k int)
	ask   func() error
	done  func()
}

// runLoops runs one goroutine per loop that newLoop makes, for duration,
// each asking one request at a time. pctNew percent of the requests have
// a new key (the request's number); the others repeat one of the loop's
// first 64. It prints the rate and the latency percentiles, then what
// extra returns; a loop's error ends that loop and the run returns it.
func runLoops(loops int, duration time.Duration, pctNew int, newLoop func(c int) (loop, error), extra func() string) error {
	var wg sync.WaitGroup
	results := make([][]time.Duration, loops)
	errs := make([]error, loops)
	start := time.Now()
	deadline := start.Add(duration)
	for c := range loops {
		l, err := newLoop(c)
		if err != nil {
			wg.Wait()
			return err
		}
		wg.Go(func() {
			if l.done != nil {
				defer l.done()
			}
			lat := make([]time.Duration, 0, 1<<16)
			for i := 0; time.Now().Before(deadline); i++ {
				k := i
				if i%100 >= pctNew {
					k = i % 64
				}
				l.build(k)
				t0 := time.Now()
				if err := l.ask(); err != nil {
					errs[c] = err
					return
				}
				lat = append(lat, time.Since(t0))
			}
			results[c] = lat
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return printLatencies(results, elapsed, extra())
}

// printLatencies prints the rate and the latency percentiles of the
// requests whose latencies each loop recorded in results, over elapsed,
// then extra.
func printLatencies(results [][]time.Duration, elapsed time.Duration, extra string) error {
	var all []time.Duration
	for _, l := range results {
		all = append(all, l...)
	}
	if len(all) == 0 {
		return fmt.Errorf("no replies")
	}
	slices.Sort(all)
	pct := func(p float64) time.Duration { return all[min(len(all)-1, int(p*float64(len(all))))] }
	fmt.Printf("requests/s %.0f  answered %d  p50 %v  p99 %v  p99.9 %v  max %v%s\n",
		float64(len(all))/elapsed.Seconds(), len(all), pct(0.5), pct(0.99), pct(0.999), all[len(all)-1], extra)
	return nil
}

func runNullPolicy(args []string) error {
	fs := flag.NewFlagSet("nullpolicy", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:10024", "address to answer on")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "nullpolicy: listening on %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			w := bufio.NewWriter(c)
			for {
				line, err := r.ReadSlice('\n')
				if err != nil {
					return
				}
				if len(bytes.TrimRight(line, "\r\n")) > 0 {
					continue
				}
				w.WriteString("action=DUNNO\n\n")
				if r.Buffered() == 0 {
					if w.Flush() != nil {
						return
					}
				}
			}
		}()
	}
}
