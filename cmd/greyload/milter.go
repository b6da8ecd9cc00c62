package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/d--j/go-milter"
)

// This file is greyload's milter side, for Sendmail and Postfix's
// smtpd_milters:
//
//	greyload milter     [-addr 127.0.0.1:8891 | -addr unix:/path] [-clients 16] [-duration 10s] [-new 50]
//	greyload nullmilter [-listen 127.0.0.1:8892] [-lean]
//
// milter runs -clients loops for -duration, each holding one conversation
// at a time as an MTA does for one SMTP session: a connection, the
// negotiation, connect, HELO, MAIL, one RCPT, abort and quit, through
// github.com/d--j/go-milter's client. It reports conversations/s and their
// latency percentiles. -new percent of the conversations are new triplets;
// the rest repeat one of the loop's first 64.
//
// nullmilter answers every event with "continue" (the library's NoOpMilter),
// through the same library's server: the baseline that shows what the
// protocol and the machine cost. With -lean it asks the MTA for what
// greydaemon asks (no HELO, no headers or body, no replies to connect and
// MAIL), so that the two differ only by the decision.

func runMilter(args []string) error {
	fs := flag.NewFlagSet("milter", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:8891", "milter address: host:port or unix:/path")
	clients := fs.Int("clients", 16, "conversations at once")
	duration := fs.Duration("duration", 10*time.Second, "how long to send")
	pNew := fs.Int("new", 50, "percent of conversations with a new triplet")
	fs.Parse(args)
	network, address := "tcp", *addr
	if path, ok := strings.CutPrefix(*addr, "unix:"); ok {
		network, address = "unix", path
	}
	client := milter.NewClient(network, address, milter.WithActions(milter.OptAddHeader))
	runID := strconv.FormatInt(time.Now().UnixNano()%1_000_000, 10)
	return runLoops(*clients, *duration, *pNew, func(c int) (loop, error) {
		var ip, rcpt string
		return loop{
			build: func(k int) {
				ip = "10." + strconv.Itoa(c) + "." + strconv.Itoa(k%200) + ".1"
				rcpt = "r" + strconv.Itoa(k) + "-" + runID + "@rcpt.example"
			},
			ask: func() error { return converse(client, ip, rcpt) },
		}, nil
	}, func() string { return "" })
}

// converse holds one conversation with one recipient from ip.
func converse(client *milter.Client, ip, rcpt string) error {
	s, err := client.Session(nil)
	if err != nil {
		return err
	}
	defer s.Close()
	if _, err := s.Conn("client.example", milter.FamilyInet, 4025, ip); err != nil {
		return err
	}
	if _, err := s.Helo("client.example"); err != nil {
		return err
	}
	if _, err := s.Mail("load@sender.example", ""); err != nil {
		return err
	}
	act, err := s.Rcpt(rcpt, "")
	if err != nil {
		return err
	}
	if act.Type != milter.ActionContinue && act.Type != milter.ActionRejectWithCode && act.Type != milter.ActionSkip {
		return fmt.Errorf("unexpected answer to RCPT: %v", act)
	}
	if err := s.Abort(nil); err != nil {
		return err
	}
	return s.Close()
}

func runNullMilter(args []string) error {
	fs := flag.NewFlagSet("nullmilter", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:8892", "address to answer on")
	lean := fs.Bool("lean", false, "ask for greydaemon's protocol options")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "nullmilter: listening on %s\n", ln.Addr())
	opts := []milter.Option{milter.WithMilter(func() milter.Milter { return milter.NoOpMilter{} })}
	if *lean {
		opts = append(opts, milter.WithProtocols(milter.OptNoHelo|milter.OptNoHeaders|milter.OptNoEOH|milter.OptNoBody|
			milter.OptNoUnknown|milter.OptNoData|milter.OptNoConnReply|milter.OptNoHeloReply|milter.OptNoMailReply))
	}
	server := milter.NewServer(opts...)
	return server.Serve(ln)
}
