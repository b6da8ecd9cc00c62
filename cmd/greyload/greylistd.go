package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// This file is greyload's Exim side, greylistd's protocol:
//
//	greyload greylistd     [-socket /path] [-clients 4] [-duration 10s] [-new 50]
//	greyload nullgreylistd [-socket /path]
//
// greylistd runs -clients loops for -duration, each sending one request per
// connection as Exim's readsocket does (connect, send, close the sending
// side, read the answer to the end), and reports requests/s and latency
// percentiles, and how often the listen queue was full (busy). -new percent of the requests are new data strings; the rest
// repeat one of the loop's first 64.
//
// nullgreylistd answers every connection's first read with "false" and
// closes it, with a goroutine per connection: the baseline that shows what
// the machine's unix-socket path costs.

func runGreylistd(args []string) error {
	fs := flag.NewFlagSet("greylistd", flag.ExitOnError)
	socket := fs.String("socket", "/run/greydaemon/greylistd.sock", "greylistd socket")
	clients := fs.Int("clients", 4, "loops, one request in flight each")
	duration := fs.Duration("duration", 10*time.Second, "how long to send")
	pNew := fs.Int("new", 50, "percent of requests that are new data strings")
	fs.Parse(args)
	runID := strconv.FormatInt(time.Now().UnixNano()%1_000_000, 10)
	var busy atomic.Uint64
	return runLoops(*clients, *duration, *pNew, func(c int) (loop, error) {
		buf := make([]byte, 256)
		var req string
		return loop{
			build: func(k int) {
				req = "--grey 10." + strconv.Itoa(c) + "." + strconv.Itoa(k%200) + ".0/24 load@sender.example r" +
					strconv.Itoa(k) + "-" + runID + "@rcpt.example"
			},
			ask: func() error { return askOnce(*socket, req, buf, &busy) },
		}, nil
	}, func() string { return fmt.Sprintf("  busy %d", busy.Load()) })
}

// askOnce sends one request on a new connection, as Exim's readsocket
// does, and reads the answer to the end.
// A full listen queue (EAGAIN) is retried after 100 µs and counted in busy:
// Exim would have taken it as a failure and, with the usual {false}
// fallback, accepted the mail unchecked.
func askOnce(path, req string, buf []byte, busy *atomic.Uint64) error {
	var c *net.UnixConn
	for tries := 0; ; tries++ {
		var err error
		c, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EAGAIN) || tries == 10000 {
			return err
		}
		busy.Add(1)
		time.Sleep(100 * time.Microsecond)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return err
	}
	c.CloseWrite()
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		if n == len(buf) {
			n = 0
		}
	}
	if n == 0 {
		return fmt.Errorf("empty answer to %q", req)
	}
	return nil
}

func runNullGreylistd(args []string) error {
	fs := flag.NewFlagSet("nullgreylistd", flag.ExitOnError)
	socket := fs.String("socket", "/tmp/nullgreylistd.sock", "socket to answer on")
	fs.Parse(args)
	os.Remove(*socket)
	ln, err := net.Listen("unix", *socket)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "nullgreylistd: listening on %s\n", *socket)
	// Read buffers come from a pool, as greydaemon's do: a 16 KB array on
	// each goroutine's stack would make every connection grow a stack.
	buffers := sync.Pool{New: func() any { return new([16384]byte) }}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			buf := buffers.Get().(*[16384]byte)
			defer buffers.Put(buf)
			if _, err := c.Read(buf[:]); err != nil && err != io.EOF {
				return
			}
			io.WriteString(c, "false")
		}()
	}
}
