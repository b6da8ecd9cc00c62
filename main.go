// Greydaemon is a greylisting daemon for qmail, a drop-in replacement for
// John Levine's Perl greydaemon.
//
// Patched qmail-smtpd sends one UDP datagram per message at DATA with the
// client IP, the envelope sender and the recipients, and reads a 2-byte
// verdict: greylist (450) or accept. Greydaemon takes the Perl daemon's
// command line and save file, answers as it does (see protocol.md), and keeps
// its state in a sharded in-memory table that it snapshots to disk.
//
// Usage:
//
//	greydaemon [-d] [-c config.toml] [-u user] [-w whitelist] [-s minutes]
//	           [-t days] [-g hours] [-m minutes] [ipaddr[:port] savefile]
//	greydaemon dump FILE
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "greydaemon: error: %v\n", err)
		if errors.Is(err, errUsage) {
			fmt.Fprint(os.Stderr, usageText)
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// run runs greydaemon with the command-line arguments args until ctx is
// done, and returns nil after a clean shutdown.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "dump" {
		if len(args) != 2 {
			return fmt.Errorf("%w: dump takes one file", errUsage)
		}
		return dumpFile(args[1], stdout)
	}
	cfg, err := parseCommandLine(args, stderr)
	if err != nil {
		return err
	}
	d := &daemon{cfg: cfg, stdout: stdout, stderr: stderr, now: time.Now}
	return d.run(ctx)
}

// A daemon is one run of the server: socket, table, snapshots, logs.
type daemon struct {
	cfg            *Config
	stdout, stderr io.Writer
	now            func() time.Time
	// onReady, if set, is called with the socket's address once the
	// daemon answers requests. Tests use it.
	onReady func(net.Addr)
	// saveNow, if set, asks for a save at once, as SIGUSR1 does.
	saveNow chan struct{}
	// onSave, if set, is called after every save with its outcome.
	onSave func(saveStats, error)
}

// run starts the daemon, serves until ctx is done, then stops reading,
// waits for requests in flight, writes a final snapshot and flushes the log.
func (d *daemon) run(ctx context.Context) error {
	cfg := d.cfg
	log := &logger{w: d.stderr, debug: cfg.Debug}
	var wl *Whitelist
	if cfg.Whitelist != "" {
		var err error
		wl, err = LoadWhitelist(cfg.Whitelist, func(msg string) { log.Warnf("%s", msg) })
		if err != nil {
			return err
		}
	}
	hostport, err := listenAddress(cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	laddr, err := net.ResolveUDPAddr("udp", hostport)
	if err != nil {
		return fmt.Errorf("cannot resolve listen address %q: %w", cfg.Listen, err)
	}
	conns, err := listenUDP(laddr, socketCount())
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %w", hostport, err)
	}
	defer closeAll(conns)
	for _, conn := range conns {
		if err := conn.SetReadBuffer(socketBuffer); err != nil {
			log.Warnf("cannot enlarge the socket receive buffer: %v", err)
		}
	}
	conn := conns[0]
	if cfg.User != "" {
		if err := dropPrivileges(cfg.User); err != nil {
			return err
		}
	} else if os.Geteuid() == 0 {
		log.Warnf("running as root; use -u to switch to an unprivileged user")
	}

	if os.Getenv("GOGC") == "" {
		// The tables hold no pointers, so a collection costs little however
		// large they are; collecting at 50% growth instead of 100% keeps
		// the resident memory per entry near the live heap's.
		debug.SetGCPercent(50)
	}
	policy := policyFromConfig(cfg)
	emptyState := func() (*table, *snapshotter) {
		tbl := newTable(shardsFor(cfg.MaxEntries), cfg.MaxEntries)
		return tbl, &snapshotter{path: cfg.StateFile, table: tbl, policy: policy, now: d.now}
	}
	tbl, snap := emptyState()
	start := time.Now()
	st, err := snap.load()
	switch {
	case errors.Is(err, errCorrupt):
		log.Errorf("state file is damaged, starting with an empty table: %v", err)
		tbl, snap = emptyState() // the damaged file may have filled part of it
		if aside, err := setAside(cfg.StateFile, d.now()); err != nil {
			log.Errorf("%v", err)
			return fmt.Errorf("refusing to overwrite the damaged state file %q", cfg.StateFile)
		} else {
			log.Errorf("damaged state file kept as %q", aside)
		}
	case err != nil:
		return err
	default:
		log.Infof("loaded %s state file %q: %d known IPs, %d grey triplets, %d expired skipped, %d bad lines skipped, in %v",
			st.format, cfg.StateFile, st.known, st.grey, st.expired, st.bad, time.Since(start).Round(time.Millisecond))
	}

	g := NewGreylister(tbl, policy, wl, d.now)
	dlog := newDecisionLog(d.stdout)
	srv := &server{g: g, conns: conns, dlog: dlog, log: log}

	bg, stopBackground := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		g.sweep(bg, time.Minute, func(deleted int) {
			if cfg.Debug {
				known, grey := tbl.counts()
				log.Debugf("sweep: %d expired entries dropped; holding %d known IPs and %d grey triplets; %d evicted for the cap so far",
					deleted, known, grey, tbl.evicted.Load())
			}
		})
	})
	wg.Go(func() { dlog.flushEvery(bg, time.Second) })
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	save := func(why string) {
		st, err := snap.save()
		if d.onSave != nil {
			defer d.onSave(st, err)
		}
		if err != nil {
			log.Errorf("cannot save state (%s), keeping the previous snapshot; will retry: %v", why, err)
			return
		}
		log.Debugf("saved %d known IPs and %d grey triplets to %q (%d bytes, %v, %s); %d evicted, %d expired so far",
			st.known, st.grey, cfg.StateFile, st.bytes, st.elapsed.Round(time.Millisecond), why,
			tbl.evicted.Load(), tbl.expired.Load())
	}
	wg.Go(func() {
		t := time.NewTicker(cfg.SaveInterval.Duration)
		defer t.Stop()
		for {
			select {
			case <-bg.Done():
				return
			case <-t.C:
				save("timer")
			case <-usr1:
				save("SIGUSR1")
			case <-d.saveNow:
				save("request")
			}
		}
	})

	served := make(chan struct{})
	go func() { srv.serve(readersPerSocket(len(conns))); close(served) }()
	log.Infof("listening on %s", conn.LocalAddr())
	if d.onReady != nil {
		d.onReady(conn.LocalAddr())
	}

	<-ctx.Done()
	closeAll(conns) // unblocks every reader
	<-served
	stopBackground()
	wg.Wait() // the saver has finished: the final save runs alone
	save("shutdown")
	if err := dlog.flush(); err != nil {
		log.Errorf("cannot write the decision log: %v", err)
	}
	log.Infof("stopped: %d requests, %d malformed, %d replies",
		srv.stats.requests.Load(), srv.stats.malformed.Load(), srv.stats.replies.Load())
	return nil
}
