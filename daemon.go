package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// This file is the daemon's lifecycle: open (settings, sockets, privileges,
// state), serve (front ends, background work, signals), and shutdown (one
// stop order, the final save). Each front end answers one protocol on
// sockets that open bound; they share the Greylister.

// A frontEnd serves one protocol on its own sockets.
type frontEnd interface {
	// Name names the front end in logs and metrics.
	Name() string
	// Addr returns the address it answers on.
	Addr() net.Addr
	// Serve serves until Close is called, then returns nil once the
	// requests in flight are answered.
	Serve() error
	// Close stops the front end; Serve then returns.
	Close() error
}

// A daemon is one run of greydaemon: settings, sockets, table, snapshots,
// logs and counters.
type daemon struct {
	// What it is given: how to read the settings (at start, and again at
	// each SIGHUP), its output streams, its clock, the signals (SIGTERM
	// and SIGINT stop, SIGHUP reloads, SIGUSR1 saves; nil receives none),
	// and how to tell the service manager its state (sd_notify; nil tells
	// nobody).
	load           func() (*Settings, error)
	stdout, stderr io.Writer
	now            func() time.Time
	signals        <-chan os.Signal
	notify         func(state string) error
	notifyFailed   bool
	// ownsProcess says that the daemon may set process-wide things, as
	// GOMAXPROCS; false for daemons that tests run side by side.
	ownsProcess  bool
	oneProcessor bool // run set GOMAXPROCS to 1, for Redis

	// Test hooks. onReady, if set, is called with each front end's
	// address by name once the daemon answers requests; onSave after
	// every save with its outcome; onReload after every reload. saveNow,
	// if set, asks for a save at once, as SIGUSR1 does. sweepEvery, if
	// set, replaces the sweeper's minute: a test whose clock jumps sets it
	// beyond its length, so that what expired stays until it is looked up
	// (held triplets past their window are stale, swept ones new).
	onReady    func(addrs map[string]net.Addr)
	onSave     func(saveStats, error)
	onReload   func(error)
	saveNow    chan struct{}
	sweepEvery time.Duration

	// The settings and the logs.
	set               *Settings // the running settings; only the run goroutine uses it
	maxEntries        int       // max_entries, which only a restart changes
	whitelistWarnings map[string]bool
	log               *logger
	outSink           *lossySink // stdout: decision lines
	errSink           *lossySink // stderr: the daemon's messages
	dlog              *decisionLog

	// The state: the table and its Greylister, Redis in Redis mode, and
	// the snapshots, with the state file's lock.
	table  *table
	g      *Greylister
	remote *redisStore // nil unless Redis is set
	snap   *snapshotter
	lock   *os.File // held while the daemon runs

	// The front ends, each also in frontEnds.
	qmail     *server
	policy    *policyServer  // nil unless policy_listen is set
	list      *listServer    // nil unless greylistd_listen is set
	milter    *milterServer  // nil unless milter_listen is set
	metrics   *metricsServer // nil unless metrics_listen is set
	frontEnds []frontEnd

	// The run loop: saveRequests carries the greylistd save command's
	// requests to it; loopDone is closed when it has stopped.
	saveRequests chan chan error
	loopDone     chan struct{}

	// Counters, for the metrics.
	saves, saveFailures     atomic.Uint64
	reloads, reloadFailures atomic.Uint64
	lastSave                atomic.Pointer[savedAt]
	loadDuration            time.Duration
}

// savedAt is the last successful save.
type savedAt struct {
	saveStats
	at time.Time
}

// newDaemon returns a daemon that reads its settings with load and logs to
// stdout (decisions) and stderr (everything else).
func newDaemon(load func() (*Settings, error), stdout, stderr io.Writer) *daemon {
	return &daemon{load: load, stdout: stdout, stderr: stderr, now: time.Now,
		saveRequests: make(chan chan error), loopDone: make(chan struct{})}
}

// run opens the daemon, serves until ctx is done or a stop signal arrives,
// and shuts down. When the daemon owns its process (not in tests) and
// decides in Redis, it runs Go with one processor unless the GOMAXPROCS
// environment variable says otherwise. It returns nil after a clean shutdown with a final save.
func (d *daemon) run(ctx context.Context) error {
	set, err := d.load()
	if err != nil {
		return err
	}
	if d.ownsProcess && set.usesRedis() && os.Getenv("GOMAXPROCS") == "" {
		// Deciding in Redis, a reader mostly waits for round trips; a
		// second processor buys nothing but the scheduler's hand-offs
		// between threads (a quarter of the CPU per decision, measured).
		// It is set before the sockets are opened, which counts it.
		runtime.GOMAXPROCS(1)
		d.oneProcessor = true
	}
	if err := d.open(set); err != nil {
		d.closeOpened()
		return err
	}
	return d.serve(ctx)
}

// open does everything that can fail before the daemon answers: it takes
// the state file's lock, binds every front end's sockets, drops privileges,
// reads the whitelist (as the user the daemon runs as) and loads the state.
func (d *daemon) open(set *Settings) error {
	d.set, d.maxEntries = set, set.MaxEntries
	d.openLogs(set.Debug)
	if d.oneProcessor {
		d.log.Infof("redis: running Go on one processor, as suits a daemon waiting for round trips (the GOMAXPROCS variable overrides it)")
	}
	owner, err := d.takeLock(set)
	if err != nil {
		return err
	}
	if err := d.bindFrontEnds(set, owner); err != nil {
		return err
	}
	d.warnIfOpen(set)
	if set.User != "" {
		if err := dropPrivileges(set.User); err != nil {
			return err
		}
	} else if os.Geteuid() == 0 {
		d.log.Warnf("running as root; use -u to switch to an unprivileged user")
	}
	if err := d.loadAll(set); err != nil {
		return err
	}
	d.connectFrontEnds(set)
	return nil
}

// takeLock checks the state file's directory and takes its lock, and
// returns who files are created as before privileges are dropped: the -u
// user, when started as root (see asuser.go).
func (d *daemon) takeLock(set *Settings) (*fileOwner, error) {
	if err := checkStateDir(set.StateFile); err != nil {
		return nil, fmt.Errorf("%s: %w", set.Source.describe("state_file"), err)
	}
	owner, err := fileOwnerFor(set.User)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", set.Source.describe("user"), err)
	}
	if d.lock, err = lockStateFile(set.StateFile, owner); err != nil {
		return nil, err
	}
	return owner, nil
}

// bindFrontEnds binds every front end's sockets, or takes those the service
// manager passed, creating unix sockets as owner.
func (d *daemon) bindFrontEnds(set *Settings, owner *fileOwner) error {
	passed, err := takePassedSockets()
	if err != nil {
		return err
	}
	defer passed.closeAll() // any not taken
	if err := d.bindQmail(set, passed); err != nil {
		return err
	}
	if set.PolicyListen != "" {
		if err := d.bindPolicy(set, owner, passed); err != nil {
			return err
		}
	}
	if set.GreylistdListen != "" {
		if err := d.bindGreylistd(set, owner, passed); err != nil {
			return err
		}
	}
	if set.MilterListen != "" {
		if err := d.bindMilter(set, owner, passed); err != nil {
			return err
		}
	}
	for _, ln := range passed.streams {
		d.log.Warnf("the service manager passed the socket %s, which no front end is configured for (greylistd_listen, policy_listen, milter_listen); closing it", ln.Addr())
	}
	if set.MetricsListen != "" {
		ms, err := listenMetrics(set.MetricsListen, d.UpdateStats)
		if err != nil {
			return fmt.Errorf("%s: %w", set.Source.describe("metrics_listen"), err)
		}
		d.metrics = ms
		d.frontEnds = append(d.frontEnds, ms)
	}
	return nil
}

// bindQmail binds the qmail front end's UDP sockets, or takes those passed.
func (d *daemon) bindQmail(set *Settings, passed *passedSockets) error {
	conns, activated, err := openQmailSockets(set.ListenAddr, passed)
	if err != nil {
		return fmt.Errorf("%s: %w", set.Source.describe("listen"), err)
	}
	d.qmail = &server{conns: conns, readers: readersPerSocket(len(conns), set.usesRedis()), log: d.log}
	d.frontEnds = append(d.frontEnds, d.qmail)
	if activated {
		d.log.Infof("using %d socket(s) passed by the service manager", len(conns))
	}
	for _, conn := range conns {
		if err := conn.SetReadBuffer(socketBuffer); err != nil {
			d.log.Warnf("cannot enlarge the socket receive buffer: %v", err)
		}
	}
	return nil
}

// bindPolicy binds policy_listen, or takes the unix socket passed for it.
func (d *daemon) bindPolicy(set *Settings, owner *fileOwner, passed *passedSockets) error {
	ln, unixPath, err := d.bindStream(set, owner, passed, streamSettings{
		key: "policy_listen", spec: set.PolicyListen, mode: set.PolicyMode,
		groupKey: "policy_socket_group", group: set.PolicyGroup, purpose: "policy requests"})
	if err != nil {
		return err
	}
	d.policy = &policyServer{ln: ln, unixPath: unixPath, log: d.log, conns: newConnSet(set.PolicyMaxConnections)}
	d.frontEnds = append(d.frontEnds, d.policy)
	return nil
}

// bindMilter binds milter_listen, or takes the unix socket passed for it.
func (d *daemon) bindMilter(set *Settings, owner *fileOwner, passed *passedSockets) error {
	ln, unixPath, err := d.bindStream(set, owner, passed, streamSettings{
		key: "milter_listen", spec: set.MilterListen, mode: set.MilterMode,
		groupKey: "milter_socket_group", group: set.MilterGroup, purpose: "milter conversations"})
	if err != nil {
		return err
	}
	d.milter = newMilterServer(ln, unixPath, d.log, set.MilterMaxConnections)
	d.frontEnds = append(d.frontEnds, d.milter)
	return nil
}

// streamSettings are a stream front end's listener settings: the listen
// key and its value (host:port or unix:/path), the unix socket's mode, the
// group key and its value, and what the socket answers, for errors.
type streamSettings struct {
	key, spec       string
	mode            os.FileMode
	groupKey, group string
	purpose         string
}

// bindStream binds a stream front end's listener, or takes the unix socket
// the service manager passed for it. It returns the listener and the
// socket file to remove at close: "" for TCP, or for a passed socket,
// which stays the service manager's.
func (d *daemon) bindStream(set *Settings, owner *fileOwner, passed *passedSockets, s streamSettings) (net.Listener, string, error) {
	path, isUnix := strings.CutPrefix(s.spec, "unix:")
	if l := passed.takeUnix(path); isUnix && l != nil {
		d.log.Infof("%s: using the socket %s passed by the service manager", s.key, path)
		return l, "", nil
	}
	gid, err := socketGroup(set, s.groupKey, s.group)
	if err != nil {
		return nil, "", err
	}
	ln, unixPath, err := listenStream(s.spec, s.mode, owner, gid, s.purpose)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", set.Source.describe(s.key), err)
	}
	return ln, unixPath, nil
}

// bindGreylistd binds greylistd_listen, or takes the socket passed for
// it. A passed socket stays the service manager's file: greydaemon neither
// changes its owner nor removes it at the end.
func (d *daemon) bindGreylistd(set *Settings, owner *fileOwner, passed *passedSockets) error {
	ln, path := passed.takeUnix(set.GreylistdListen), ""
	if ln != nil {
		d.log.Infof("greylistd_listen: using the socket %s passed by the service manager", set.GreylistdListen)
	} else {
		var err error
		if ln, err = d.listenGreylistd(set, owner); err != nil {
			return err
		}
		path = set.GreylistdListen
	}
	d.list = newListServer(nil, ln, path, d.log, nil, listMaxConnections)
	d.frontEnds = append(d.frontEnds, d.list)
	return nil
}

// loadAll, as the user the daemon runs as, checks that it can save, reads
// the whitelist, loads the state and, in Redis mode, starts connecting.
func (d *daemon) loadAll(set *Settings) error {
	if err := checkStateAccess(set.StateFile); err != nil {
		return err
	}
	wl, err := d.loadWhitelist(set.Whitelist)
	if err != nil {
		return err
	}
	if os.Getenv("GOGC") == "" {
		// The tables hold no pointers, so a collection costs little however
		// large they are; collecting at 50% growth instead of 100% keeps
		// the resident memory per entry near the live heap's.
		debug.SetGCPercent(50)
	}
	if err := d.loadState(wl); err != nil {
		return err
	}
	// Which loaded triplets had passed is not saved: count only those
	// first seen from now on as ending without a retry.
	d.table.countFrom.Store(d.g.clock())
	if set.usesRedis() {
		remote, err := newRedisStore(set, d.log)
		if err != nil {
			return fmt.Errorf("%s: %w", set.Source.describe("redis_url"), err)
		}
		d.g.remote, d.remote = remote, remote
	}
	// Loading leaves garbage behind (the file's bytes, maps outgrown as they
	// filled); the runtime would give its pages back to the kernel only
	// slowly, so that a restarted daemon held half as much memory again
	// as one that filled its table by serving. Give them back now.
	debug.FreeOSMemory()
	return nil
}

// connectFrontEnds gives the front ends the Greylister, the decision log
// and their settings.
func (d *daemon) connectFrontEnds(set *Settings) {
	d.dlog = newDecisionLog(d.outSink)
	d.qmail.g, d.qmail.dlog = d.g, d.dlog
	if d.policy != nil {
		d.policy.g, d.policy.dlog = d.g, d.dlog
	}
	if d.milter != nil {
		d.milter.g, d.milter.dlog = d.g, d.dlog
	}
	if d.list != nil {
		d.list.book, d.list.dlog = newListBook(d.g), d.dlog
		d.list.book.save = d.saveForRequest
		d.list.book.remote = d.remote
	}
	d.applyToFrontEnds(set)
}

// applyToFrontEnds gives the front ends the settings that a reload may
// change: the allow list, and the policy server's replies and idle timeout.
func (d *daemon) applyToFrontEnds(set *Settings) {
	d.qmail.allow.Store(set.Allow)
	if d.metrics != nil {
		d.metrics.setAllow(set.Allow)
	}
	if d.policy != nil {
		d.policy.allow.Store(set.Allow)
		d.policy.replies.Store(policyRepliesOf(set))
		d.policy.idle.Store(int64(set.PolicyIdleTimeout.Duration))
	}
	if d.milter != nil {
		d.milter.allow.Store(set.Allow)
		d.milter.replies.Store(milterRepliesOf(set))
		d.milter.idle.Store(int64(set.MilterIdleTimeout.Duration))
	}
}

// listMaxConnections caps the greylistd socket's open connections: each is
// one Exim process waiting for one answer.
const listMaxConnections = 1024

// listenGreylistd binds greylistd_listen, a unix socket made by owner
// with greylistd_socket_mode and greylistd_socket_group.
func (d *daemon) listenGreylistd(set *Settings, owner *fileOwner) (*net.UnixListener, error) {
	gid, err := socketGroup(set, "greylistd_socket_group", set.GreylistdGroup)
	if err != nil {
		return nil, err
	}
	ln, err := listenUnix(set.GreylistdListen, set.ListMode, owner, gid, "greylistd requests")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", set.Source.describe("greylistd_listen"), err)
	}
	return ln, nil
}

// socketGroup returns the ID of the group named by the setting key, or -1
// when it is empty.
func socketGroup(set *Settings, key, name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	gid, err := groupID(name)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", set.Source.describe(key), err)
	}
	return gid, nil
}

// saveForRequest asks the daemon's loop for a save now and waits for its
// outcome: the greylistd save command.
func (d *daemon) saveForRequest() error {
	reply := make(chan error, 1)
	select {
	case d.saveRequests <- reply:
	case <-d.loopDone:
		return errors.New("greydaemon is stopping")
	}
	select {
	case err := <-reply:
		return err
	case <-d.loopDone:
		return errors.New("greydaemon is stopping")
	}
}

// openLogs sets up the two output streams so that neither can stop the
// daemon: a failure on one is reported on the other, and its lines are
// counted as lost.
func (d *daemon) openLogs(debug bool) {
	d.outSink = newLossySink(d.stdout, "stdout")
	d.errSink = newLossySink(d.stderr, "stderr")
	d.log = newLogger(d.errSink, debug)
	d.outSink.report = func(s *lossySink, err error) {
		d.log.Errorf("cannot write the decision log to stdout: %v; its lines are dropped and counted (%d so far), and greydaemon keeps serving",
			err, s.lost.Load())
	}
	d.errSink.report = func(s *lossySink, err error) {
		fmt.Fprintf(d.outSink, "greydaemon: error: cannot write to stderr: %v; the daemon's messages are dropped and counted (%d so far), and greydaemon keeps serving\n",
			err, s.lost.Load())
	}
}

// loadState makes the table, the Greylister deciding on it with whitelist
// wl, and the snapshotter, and loads the state file. A damaged file is set
// aside and the daemon starts empty.
func (d *daemon) loadState(wl *IPRanges) error {
	set := d.set
	empty := func() {
		d.table = newTable(shardsFor(set.MaxEntries), set.MaxEntries)
		d.g = NewGreylister(d.table, set.Policy, wl, d.now)
		d.g.grouping, d.g.normalize = set.Grouping, set.NormalizeSender
		d.snap = &snapshotter{path: set.StateFile, table: d.table, policy: d.g.Policy, now: d.now, warn: d.log.Warnf,
			grouping: set.Grouping}
	}
	empty()
	start := time.Now()
	st, err := d.snap.load()
	d.loadDuration = time.Since(start)
	switch {
	case errors.Is(err, errCorrupt):
		d.log.Errorf("state file is damaged, starting with an empty table: %v", err)
		empty() // the damaged file may have filled part of it
		aside, err := setAside(set.StateFile, d.now())
		if err != nil {
			d.log.Errorf("%v", err)
			return fmt.Errorf("refusing to overwrite the damaged state file %q", set.StateFile)
		}
		d.log.Errorf("damaged state file kept as %q", aside)
	case err != nil:
		return err
	case st.format == "missing":
		d.log.Infof("no state file %q yet; starting empty", set.StateFile)
	default:
		lists := ""
		if st.lists > 0 {
			lists = fmt.Sprintf(", %d greylistd entries", st.lists)
		}
		d.log.Infof("loaded %s state file %q: %d known IPs, %d grey triplets%s, %d expired skipped, %d bad lines skipped, in %v",
			st.format, set.StateFile, st.known, st.grey, lists, st.expired, st.bad, d.loadDuration.Round(time.Millisecond))
	}
	return nil
}

// loadWhitelist reads the whitelist at path, or returns nil for none. It
// logs each of the file's warnings once: a reload repeats only those that
// are new since the last load.
func (d *daemon) loadWhitelist(path string) (*IPRanges, error) {
	if path == "" {
		return nil, nil
	}
	seen := map[string]bool{}
	wl, err := LoadWhitelist(path, func(msg string) {
		seen[msg] = true
		if !d.whitelistWarnings[msg] {
			d.log.Warnf("%s", msg)
		}
	})
	if err == nil {
		d.whitelistWarnings = seen
	}
	return wl, err
}

// warnIfOpen warns for each front end that answers anyone who can reach
// it: one on a network address other than loopback, with no allow list.
func (d *daemon) warnIfOpen(set *Settings) {
	for _, fe := range d.frontEnds {
		if msg := openWarning(fe.Name(), fe.Addr(), set.Allow); msg != "" {
			d.log.Warnf("%s", msg)
		}
	}
}

// openWarning returns the warning for the front end name on addr with the
// allow list allow, or "" when there is nothing to warn about: the list is
// set, or only this host can reach the address (loopback, a unix socket).
func openWarning(name string, addr net.Addr, allow *IPRanges) string {
	var ip net.IP
	switch a := addr.(type) {
	case *net.UDPAddr:
		ip = a.IP
	case *net.TCPAddr:
		ip = a.IP
	default:
		return ""
	}
	if allow != nil || ip.IsLoopback() {
		return ""
	}
	what := "query and fill the table"
	if name == "metrics" {
		what = "read the metrics"
	}
	return fmt.Sprintf("%s: listening on %s with an empty allow list: anyone who can reach the port can %s; set allow = [...]", name, addr, what)
}

// closeOpened releases what a failed open acquired.
func (d *daemon) closeOpened() {
	for _, fe := range d.frontEnds {
		fe.Close()
	}
	if d.lock != nil {
		d.lock.Close()
	}
	if d.outSink != nil {
		d.outSink.flush(logFlushTimeout)
		d.errSink.flush(logFlushTimeout)
	}
}

// serve runs the front ends and the background work, handles signals until
// ctx is done or a stop signal arrives, and then shuts down.
func (d *daemon) serve(ctx context.Context) error {
	frontEnds, stopBackground, background := d.start()
	ticker := time.NewTicker(d.set.SaveInterval.Duration)
	defer ticker.Stop()
	var requested saveQueue
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-ticker.C:
			d.save("timer")
		case <-d.saveNow:
			d.save("request")
		case reply := <-d.saveRequests:
			requested.add(reply)
		case <-requested.due():
			requested.answer(d.save("greylistd save command"))
		case sig := <-d.signals:
			if d.onSignal(sig, ticker) {
				break loop
			}
		}
	}
	close(d.loopDone)
	requested.answer(errors.New("greydaemon is stopping; its final save follows"))
	return d.shutdown(frontEnds, stopBackground, background)
}

// start starts the front ends and the background work (the sweeper), says
// where the daemon listens, and tells the service manager it is ready.
func (d *daemon) start() (frontEnds *sync.WaitGroup, stopBackground func(), background *sync.WaitGroup) {
	frontEnds, background = &sync.WaitGroup{}, &sync.WaitGroup{}
	for _, fe := range d.frontEnds {
		frontEnds.Go(func() {
			if err := fe.Serve(); err != nil {
				d.log.Errorf("%s front end stopped: %v", fe.Name(), err)
			}
		})
	}
	bg, stopBackground := context.WithCancel(context.Background())
	background.Go(func() {
		every := time.Minute
		if d.sweepEvery > 0 {
			every = d.sweepEvery
		}
		d.g.sweep(bg, every, func(deleted int) {
			known, grey := d.table.counts()
			d.log.Debugf("sweep: %d expired entries dropped; holding %d known IPs and %d grey triplets; %d evicted for the cap so far",
				deleted, known, grey, d.table.evicted.Load())
		})
	})
	addrs := map[string]net.Addr{}
	for _, fe := range d.frontEnds {
		addrs[fe.Name()] = fe.Addr()
		d.log.Infof("listening on %s for %s", fe.Addr(), fe.Name())
	}
	d.sdNotify("READY=1\nSTATUS=answering on " + d.qmail.Addr().String())
	if d.onReady != nil {
		d.onReady(addrs)
	}
	return frontEnds, stopBackground, background
}

// onSignal handles a signal: SIGHUP reloads (and restarts the save timer,
// ticker, with the new interval), SIGUSR1 saves, and any other asks to
// stop, which it reports.
func (d *daemon) onSignal(sig os.Signal, ticker *time.Ticker) (stop bool) {
	switch sig {
	case syscall.SIGHUP:
		d.sdNotify("RELOADING=1\n" + monotonicUsec())
		if d.reload() == nil {
			ticker.Reset(d.set.SaveInterval.Duration)
		}
		d.sdNotify("READY=1")
	case syscall.SIGUSR1:
		d.save("SIGUSR1")
	default:
		d.log.Infof("%v: stopping", sig)
		return true
	}
	return false
}

// A saveQueue holds the greylistd save command's requests until the next
// save they may ask for: saveRequestFloor after the last one. Every request
// that came meanwhile is answered by that one save, so that a crowd of
// clients can neither queue one save each nor make saves come oftener than
// the floor.
type saveQueue struct {
	waiting []chan error
	timer   *time.Timer // set while requests wait
	last    time.Time   // when the last requested save ended
}

// add queues the request reply.
func (q *saveQueue) add(reply chan error) {
	q.waiting = append(q.waiting, reply)
	if q.timer == nil {
		q.timer = time.NewTimer(time.Until(q.last.Add(saveRequestFloor)))
	}
}

// due delivers when the waiting requests may be saved; never when none
// wait.
func (q *saveQueue) due() <-chan time.Time {
	if q.timer == nil {
		return nil
	}
	return q.timer.C
}

// answer answers every waiting request with err, the outcome of the save
// made for them.
func (q *saveQueue) answer(err error) {
	if q.timer != nil {
		q.timer.Stop()
	}
	q.timer, q.last = nil, time.Now()
	for _, r := range q.waiting {
		r <- err
	}
	q.waiting = q.waiting[:0]
}

// saveRequestFloor is the shortest time between two saves that the
// greylistd save command asks for; requests that come sooner wait for the
// next one, and share it.
const saveRequestFloor = 5 * time.Second

// shutdown stops the daemon in one order: the front ends stop reading and
// answer what they hold, the background work stops, the final save runs
// alone, the log is flushed, and the state file's lock is released. It
// returns an error if the final save failed.
func (d *daemon) shutdown(frontEnds *sync.WaitGroup, stopBackground func(), background *sync.WaitGroup) error {
	d.sdNotify("STOPPING=1")
	for _, fe := range d.frontEnds {
		fe.Close()
	}
	frontEnds.Wait()
	if d.remote != nil {
		d.remote.close()
	}
	stopBackground()
	background.Wait()
	saveErr := d.save("shutdown")
	d.dlog.flush()
	var st Stats
	d.UpdateStats(&st)
	var total FrontEndStats
	var each []string
	for _, fe := range st.FrontEnds {
		total.Requests += fe.Requests
		total.Malformed += fe.Malformed
		total.Refused += fe.Refused
		total.Replies += fe.Replies
		if fe.Requests > 0 || fe.Refused > 0 {
			each = append(each, fmt.Sprintf("%s %d", fe.Name, fe.Requests))
		}
	}
	byFrontEnd := ""
	if len(each) > 1 || len(each) == 1 && !strings.HasPrefix(each[0], "qmail ") {
		byFrontEnd = " (" + strings.Join(each, ", ") + ")"
	}
	lost := ""
	if st.StdoutLinesLost+st.StderrLinesLost > 0 {
		lost = fmt.Sprintf("; log lines lost: %d on stdout, %d on stderr", st.StdoutLinesLost, st.StderrLinesLost)
	}
	d.log.Infof("stopped: %d requests%s, %d malformed, %d refused, %d replies%s",
		total.Requests, byFrontEnd, total.Malformed, total.Refused, total.Replies, lost)
	d.errSink.flush(logFlushTimeout)
	d.lock.Close()
	if saveErr != nil {
		return fmt.Errorf("the final save failed; changes since the last good save are lost: %w", saveErr)
	}
	return nil
}

// save writes a snapshot and logs and counts the outcome. why says what
// asked for it.
func (d *daemon) save(why string) error {
	st, err := d.snap.save()
	if d.onSave != nil {
		defer d.onSave(st, err)
	}
	if err != nil {
		d.saveFailures.Add(1)
		retry := "; will retry"
		if why == "shutdown" {
			retry = ""
		}
		d.log.Errorf("cannot save state (%s), keeping the previous snapshot%s: %v", why, retry, err)
		return err
	}
	d.saves.Add(1)
	d.lastSave.Store(&savedAt{saveStats: st, at: d.now()})
	if why == "SIGUSR1" {
		d.log.Infof("saved %d known IPs and %d grey triplets to %q (SIGUSR1)", st.known, st.grey, d.set.StateFile)
		return nil
	}
	d.log.Debugf("saved %d known IPs and %d grey triplets to %q (%d bytes, %v, %s); %d evicted, %d expired so far",
		st.known, st.grey, d.set.StateFile, st.bytes, st.elapsed.Round(time.Millisecond), why,
		d.table.evicted.Load(), d.table.expired.Load())
	return nil
}

// reload re-reads the settings and the whitelist and applies them. On any
// error the running settings stay. Settings that only a restart can change
// (sockets, state file, user, table size) keep their running values, with
// a warning.
func (d *daemon) reload() (err error) {
	defer func() {
		if err != nil {
			d.reloadFailures.Add(1)
			d.log.Errorf("reload failed, keeping the running settings: %v", err)
		} else {
			d.reloads.Add(1)
		}
		if d.onReload != nil {
			d.onReload(err)
		}
	}()
	set, err := d.load()
	if err != nil {
		return err
	}
	wl, err := d.loadWhitelist(set.Whitelist)
	if err != nil {
		return err
	}
	if set, err = d.keepRestartOnly(set); err != nil {
		return err
	}
	d.g.SetRules(set.Policy, wl)
	d.applyToFrontEnds(set)
	d.log.setDebug(set.Debug)
	d.set = set
	d.warnIfOpen(set)
	d.log.Infof("reloaded settings%s: %d whitelist ranges, %d allowed networks, min delay %ds, resend window %ds, known-IP lifetime %ds",
		fromFile(set), wl.Len(), set.Allow.Len(), set.Policy.MinResendDelay, set.Policy.ResendWindow, set.Policy.KnownIPLifetime)
	return nil
}

// restartOnly lists the settings that only a restart applies: the sockets,
// the state file, the user, the table's size and keys, and Redis's
// connection. A reload that changes one keeps its running value and says
// so. Every other key (reloadable) takes effect at the reload.
var restartOnly = map[string]bool{
	"listen": true, "state_file": true, "user": true, "max_entries": true, "metrics_listen": true,
	"ipv4_prefix": true, "ipv6_prefix": true, "normalize_sender": true,
	"policy_listen": true, "policy_socket_mode": true, "policy_socket_group": true, "policy_max_connections": true,
	"greylistd_listen": true, "greylistd_socket_mode": true, "greylistd_socket_group": true,
	"milter_listen": true, "milter_socket_mode": true, "milter_socket_group": true, "milter_max_connections": true,
	"redis_url": true, "redis_sentinels": true, "redis_master": true, "redis_prefix": true,
	"redis_timeout": true, "redis_fallback": true,
}

// reloadable lists the settings a reload applies.
var reloadable = map[string]bool{
	"whitelist": true, "save_interval": true, "known_ip_lifetime": true, "resend_window": true,
	"min_resend_delay": true, "debug": true, "allow": true,
	"policy_defer_text": true, "policy_prepend_header": true, "policy_idle_timeout": true,
	"greylistd_retry_min": true, "greylistd_retry_max": true, "greylistd_expire": true,
	"milter_idle_timeout": true, "milter_add_header": true, "milter_delayed_reject": true,
}

// keepRestartOnly returns set with the running value of every restartOnly
// setting it changes, warning for each that it takes effect at the next
// start.
func (d *daemon) keepRestartOnly(set *Settings) (*Settings, error) {
	was, is := reflect.ValueOf(&d.set.Config).Elem(), reflect.ValueOf(&set.Config).Elem()
	cfg := set.Config
	kept := reflect.ValueOf(&cfg).Elem()
	changed := false
	for i := range was.NumField() {
		key := was.Type().Field(i).Tag.Get("toml")
		if !restartOnly[key] || reflect.DeepEqual(was.Field(i).Interface(), is.Field(i).Interface()) {
			continue
		}
		d.log.Warnf("reload: %s changed from %v to %v; it takes effect at the next start", key, was.Field(i), is.Field(i))
		kept.Field(i).Set(was.Field(i))
		changed = true
	}
	if !changed {
		return set, nil
	}
	return resolve(cfg, set.Source)
}

// policyRepliesOf returns the policy reply settings of set.
func policyRepliesOf(set *Settings) *policyReplies {
	text, _ := parseDeferText(set.PolicyDeferText) // checked by resolve
	return &policyReplies{deferText: text, prepend: set.PolicyPrependHeader}
}

// milterRepliesOf returns the milter reply settings of set: its own, and
// the Postfix front end's defer text.
func milterRepliesOf(set *Settings) *milterReplies {
	text, _ := parseDeferText(set.PolicyDeferText) // checked by resolve
	return &milterReplies{deferText: text, header: set.MilterAddHeader, delayedReject: set.MilterDelayedReject}
}

// fromFile returns " from FILE" when the settings came from a config file.
func fromFile(set *Settings) string {
	if set.Source.File == "" {
		return ""
	}
	return " from " + set.Source.File
}

// sdNotify tells the service manager the daemon's state, if it listens,
// and logs the first failure.
func (d *daemon) sdNotify(state string) {
	if d.notify == nil {
		return
	}
	if err := d.notify(state); err != nil && !d.notifyFailed {
		d.notifyFailed = true
		d.log.Warnf("cannot notify the service manager (%s): %v", strings.SplitN(state, "\n", 2)[0], err)
	}
}

// UpdateStats fills st with the daemon's counters. It is safe to call at
// any time from any goroutine once the daemon is open.
func (d *daemon) UpdateStats(st *Stats) {
	st.FrontEnds = st.FrontEnds[:0]
	for _, fe := range d.frontEnds {
		if r, ok := fe.(statsReporter); ok {
			fs := FrontEndStats{Name: fe.Name()}
			r.UpdateStats(&fs)
			st.FrontEnds = append(st.FrontEnds, fs)
		}
	}
	st.KnownIPs, st.GreyTriplets = d.table.counts()
	st.ListEntries = d.table.listCount()
	st.MaxEntries = d.maxEntries
	st.Evictions = d.table.evicted.Load()
	st.Expirations = d.table.expired.Load()
	st.FutureTimesClamped = d.table.clamped.Load()
	st.GreyUnretried = d.table.unretried.Load()
	st.Saves, st.SaveFailures = d.saves.Load(), d.saveFailures.Load()
	if s := d.lastSave.Load(); s != nil {
		st.LastSave, st.LastSaveDuration, st.LastSaveBytes = s.at, s.elapsed, s.bytes
	}
	st.LoadDuration = d.loadDuration
	st.Reloads, st.ReloadFailures = d.reloads.Load(), d.reloadFailures.Load()
	st.BadLinesNotLogged = d.dlog.dropped()
	st.StdoutLinesLost, st.StderrLinesLost = d.outSink.lost.Load(), d.errSink.lost.Load()
	st.RetryDelays, st.RetryDelayCount, st.RetryDelaySum = d.g.retryDelays.snapshot()
	if d.list != nil && d.list.book != nil {
		st.ListAnswers = make([][]uint64, len(d.list.book.answered))
		for c := range d.list.book.answered {
			st.ListAnswers[c] = make([]uint64, len(d.list.book.answered[c]))
			for l := range d.list.book.answered[c] {
				st.ListAnswers[c][l] = d.list.book.answered[c][l].Load()
			}
		}
	}
	if r := d.remote; r != nil {
		st.Redis, st.RedisUp = true, r.client.Load() != nil && !r.down.Load()
		st.RedisCalls, st.RedisFailures, st.Fallbacks = r.calls.Load(), r.failures.Load(), r.fallbacks.Load()
	}
}
