package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// This file runs greydaemon against a real Redis (Debian's redis-server):
// private instances on random ports of 127.0.0.1 in temporary directories.

// startRedis starts a private redis-server on port (0: a free one) and
// returns its port and the command, to kill it.
func startRedis(t *testing.T, port int, extra ...string) (int, *exec.Cmd) {
	t.Helper()
	bin := requireTool(t, "redis-server", "redis-server")
	fixed := port != 0
	for try := 0; ; try++ {
		if !fixed {
			port = freeTCPPort(t)
		}
		args := append([]string{"--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
			"--dir", t.TempDir(), "--protected-mode", "no"}, extra...)
		cmd := exec.Command(bin, args...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		t.Cleanup(func() { cmd.Process.Kill(); <-exited })
		if redisAnswers(port, exited) {
			return port, cmd
		}
		// The free port was taken meanwhile, or the server failed: try
		// another port, twice at most.
		cmd.Process.Kill()
		if fixed || try == 2 {
			t.Fatalf("redis-server on port %d does not answer", port)
		}
	}
}

// waitGone waits up to 10 s until the killed process cmd is gone (startRedis
// reaps it).
func waitGone(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	for range 1000 {
		if cmd.Process.Signal(syscall.Signal(0)) != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("process %d did not end", cmd.Process.Pid)
}

// redisAnswers waits up to 5 s for the Redis on port to answer PING, and
// gives up early if exited closes.
func redisAnswers(port int, exited <-chan struct{}) bool {
	for range 100 {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			fmt.Fprint(c, "PING\r\n")
			c.SetReadDeadline(time.Now().Add(time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "+PONG") {
				return true
			}
		}
		select {
		case <-exited:
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
	return false
}

// waitRedisConnected waits up to 10 s until td has connected to Redis.
func waitRedisConnected(t *testing.T, td *testDaemon) {
	t.Helper()
	for i := 0; td.remote.client.Load() == nil; i++ {
		if i == 200 {
			t.Fatal("the daemon did not connect to Redis within 10 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startRedisDaemon runs a daemon deciding in the Redis on port, and waits
// until it has connected.
func startRedisDaemon(t *testing.T, port int, clock *fakeClock) *testDaemon {
	t.Helper()
	cfg := defaultConfig()
	cfg.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	cfg.StateFile = filepath.Join(t.TempDir(), "state")
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
	waitRedisConnected(t, td)
	return td
}

// TestRedisSharedByTwoDaemons greylists at one daemon and retries at the
// other, as a sender does with two MX hosts: the retry passes, and a client
// that became known at one is known at the other.
func TestRedisSharedByTwoDaemons(t *testing.T) {
	port, _ := startRedis(t, 0)
	clock := newFakeClock()
	a, b := startRedisDaemon(t, port, clock), startRedisDaemon(t, port, clock)
	ca, cb := dial(t, a.addr), dial(t, b.addr)
	ask := func(conn *net.UDPConn, d []byte, want []byte) {
		t.Helper()
		wait := 5 * time.Second
		if want == nil {
			wait = 300 * time.Millisecond // no reply is the answer
		}
		if got := exchange(t, conn, d, wait); !bytes.Equal(got, want) {
			t.Fatalf("%q: reply %x, want %x", d, got, want)
		}
	}
	ask(ca, req("192.0.2.1", alice, bob, carol), []byte{0, 1})
	clock.advance(time.Minute)
	ask(cb, req("192.0.2.1", alice, bob), []byte{0, 2}) // too soon, at the other host
	clock.advance(5 * time.Minute)
	ask(cb, req("192.0.2.1", alice, bob), []byte{1, 3})   // the retry at the other host passes
	ask(ca, req("192.0.2.1", "x@y", "z@w"), []byte{1, 2}) // and the client is known at both
	ask(ca, req("192.0.2.2", "", verp), []byte{1, 4})     // the bounce rule
	ask(ca, []byte("I192.0.2.3\x00Fa@b\x00Tc@d\x00Xjunk\x00"), nil)
	ask(cb, req("192.0.2.3", "a@b", "c@d"), []byte{0, 2}) // recorded before the bad field, as locally
	var st Stats
	b.UpdateStats(&st)
	if !st.Redis || !st.RedisUp || st.RedisCalls < 3 || st.Fallbacks != 0 {
		t.Errorf("stats: redis %v up %v calls %d fallbacks %d", st.Redis, st.RedisUp, st.RedisCalls, st.Fallbacks)
	}
	// Nothing was decided in the local tables.
	if known, grey := a.table.counts(); known+grey != 0 {
		t.Errorf("the local table holds %d entries", known+grey)
	}
}

// TestRedisDownFallsBackAndRecovers kills Redis under a daemon: requests
// are decided from the local table, promptly, and once Redis is back the
// daemon decides there again without a restart.
func TestRedisDownFallsBackAndRecovers(t *testing.T) {
	port, redis := startRedis(t, 0)
	clock := newFakeClock()
	td := startRedisDaemon(t, port, clock)
	conn := dial(t, td.addr)
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("with Redis: %x", got)
	}
	redis.Process.Signal(syscall.SIGKILL)
	waitGone(t, redis)
	start := time.Now()
	for i := range 50 {
		if got := exchange(t, conn, req("192.0.2.9", alice, fmt.Sprintf("r%d@x", i)), 2*time.Second); !bytes.Equal(got, []byte{0, 1}) {
			t.Fatalf("request %d with Redis down: reply %x, want 0001 from the local table", i, got)
		}
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("50 requests with Redis down took %v; the deadline and the backoff should keep them prompt", d)
	}
	var st Stats
	td.UpdateStats(&st)
	if st.RedisUp || st.Fallbacks < 49 {
		t.Fatalf("with Redis down: up %v, %d fallback decisions", st.RedisUp, st.Fallbacks)
	}
	if _, grey := td.table.counts(); grey < 50 {
		t.Fatalf("the local table holds %d grey triplets, want the fallback's 50", grey)
	}
	startRedis(t, port) // back, empty
	deadline := time.Now().Add(20 * time.Second)
	for {
		exchange(t, conn, req("192.0.2.5", alice, bob), 2*time.Second)
		td.UpdateStats(&st)
		if st.RedisUp {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the daemon did not use Redis again within 20 s of its return")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The restarted Redis is empty: 192.0.2.1's triplet is new to it.
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("after Redis came back: %x", got)
	}
	log := td.errOut.String()
	if !strings.Contains(log, "redis: unavailable") || !strings.Contains(log, "redis: answering again") {
		t.Errorf("log:\n%s", log)
	}
}

// TestImportRedis copies a Perl save file into Redis and checks that a
// daemon deciding there knows what the file held.
func TestImportRedis(t *testing.T) {
	port, _ := startRedis(t, 0)
	clock := newFakeClock()
	now := clock.now().Unix()
	dir := t.TempDir()
	save := filepath.Join(dir, "greydata")
	os.WriteFile(save, []byte(fmt.Sprintf("I %d 192.0.2.1\nG %d 192.0.2.7 alice@sender.example bob@rcpt.example\nI 1000 192.0.2.99\n",
		now-3600, now-600)), 0o644)
	conf := filepath.Join(dir, "g.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("redis_url = \"redis://127.0.0.1:%d/0\"\n", port)), 0o644)
	var out bytes.Buffer
	if err := importRedisCommand([]string{"-c", conf, save}, &out, clock.now); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "copied 1 known IPs, 1 grey triplets and 0 greylistd entries") || !strings.Contains(out.String(), "1 expired left out") {
		t.Fatalf("output %q", out.String())
	}
	td := startRedisDaemon(t, port, clock)
	conn := dial(t, td.addr)
	if got := exchange(t, conn, req("192.0.2.1", "x@y", "z@w"), 5*time.Second); !bytes.Equal(got, []byte{1, 2}) {
		t.Errorf("imported known IP: %x, want 0102", got)
	}
	if got := exchange(t, conn, req("192.0.2.7", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{1, 3}) {
		t.Errorf("retry of an imported triplet: %x, want 0103", got)
	}
	if err := importRedisCommand([]string{save}, &out, clock.now); err == nil || !strings.Contains(err.Error(), "no redis_url") {
		t.Errorf("without Redis settings: %v", err)
	}
}

// redisInfo returns the INFO section of the redis-server on port.
func redisInfo(t *testing.T, port int, section string) string {
	t.Helper()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return ""
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(c, "INFO %s\r\n", section)
	r := bufio.NewReader(c)
	head, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(head, "$") {
		return ""
	}
	var n int
	fmt.Sscanf(head[1:], "%d", &n)
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return ""
	}
	return string(body)
}

// TestRedisSentinelFailover runs a master, a replica and a Sentinel: a
// triplet greylisted through the master passes its retry through the
// replica that the Sentinel promotes when the master dies, and the daemon
// follows the failover without a restart.
func TestRedisSentinelFailover(t *testing.T) {
	master, masterCmd := startRedis(t, 0)
	replicaPort, _ := startRedis(t, 0, "--replicaof", "127.0.0.1", fmt.Sprint(master))
	bin := requireTool(t, "redis-server", "redis-server")
	sentinelPort := freeTCPPort(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "sentinel.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor mymaster 127.0.0.1 %d 1\n"+
		"sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n", sentinelPort, dir, master)), 0o644)
	sentinel := exec.Command(bin, conf, "--sentinel")
	if err := sentinel.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sentinel.Process.Kill(); sentinel.Wait() })
	waitFor := func(what string, limit time.Duration, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(limit); !ok(); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %v", what, limit)
			}
		}
	}
	waitFor("the replica in sync", 20*time.Second, func() bool {
		return strings.Contains(redisInfo(t, master, "replication"), "connected_slaves:1")
	})
	// The Sentinel must know the replica before the master dies, or it has
	// nothing to promote; it learns replicas from the master's INFO, which
	// it asks every 10 s.
	waitFor("the Sentinel watching the master and its replica", 30*time.Second, func() bool {
		info := redisInfo(t, sentinelPort, "sentinel")
		return strings.Contains(info, "status=ok") && strings.Contains(info, "slaves=1")
	})

	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.RedisSentinels = []string{fmt.Sprintf("127.0.0.1:%d", sentinelPort)}
	cfg.RedisMaster = "mymaster"
	cfg.StateFile = filepath.Join(t.TempDir(), "state")
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
	waitFor("the daemon connected", 20*time.Second, func() bool { return td.remote.client.Load() != nil })
	conn := dial(t, td.addr)
	if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
		t.Fatalf("first attempt: %x", got)
	}
	waitFor("the write replicated", 10*time.Second, func() bool {
		info := redisInfo(t, master, "replication")
		var offset int64
		for _, line := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "master_repl_offset:"); ok {
				fmt.Sscan(v, &offset)
			}
		}
		return offset > 0 && strings.Contains(info, fmt.Sprintf("offset=%d,", offset))
	})
	masterCmd.Process.Kill()
	waitGone(t, masterCmd)
	clock.advance(6 * time.Minute)
	var got []byte
	waitFor("a retry answered from the promoted replica", 30*time.Second, func() bool {
		got = exchange(t, conn, req("192.0.2.1", alice, bob), time.Second)
		return bytes.Equal(got, []byte{1, 3})
	})
	if !strings.Contains(redisInfo(t, replicaPort, "replication"), "role:master") {
		t.Error("the replica was not promoted")
	}
}

// TestRedisDecidesAsLocally sends the same random requests, in batches as a
// reader decides them, to a Greylister deciding in a real Redis and to one
// deciding in its own table, with a clock that jumps across the minimum
// delay, the resend window and the known-IP lifetime: every verdict and
// every malformed request agrees.
func TestRedisDecidesAsLocally(t *testing.T) {
	port, _ := startRedis(t, 0)
	clock := newFakeClock()
	cfg := defaultConfig()
	cfg.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	cfg.RedisPrefix = "model:"
	set, err := settingsOf(t, cfg)()
	if err != nil {
		t.Fatal(err)
	}
	store, err := newRedisStore(set, newLogger(io.Discard, false))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.close)
	for i := 0; store.client.Load() == nil; i++ {
		if i == 200 {
			t.Fatal("no connection to Redis within 10 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	wl, err := parseAllow([]string{"192.0.2.9"})
	if err != nil {
		t.Fatal(err)
	}
	local := NewGreylister(newTable(4, 10000), set.Policy, wl, clock.now)
	remote := NewGreylister(newTable(4, 10000), set.Policy, wl, clock.now)
	remote.remote = store

	rng := rand.New(rand.NewPCG(1, 2))
	pick := func(s ...string) string { return s[rng.IntN(len(s))] }
	steps := []time.Duration{0, 10 * time.Second, 2 * time.Minute, 6 * time.Minute, 5 * time.Hour,
		time.Duration(set.Policy.ResendWindow) * time.Second, 3 * 24 * time.Hour,
		time.Duration(set.Policy.KnownIPLifetime) * time.Second}
	var kb keyBuilder
	var batch [readBatchSize]remoteRequest
	verdicts := map[Verdict]int{}
	client := *store.client.Load()
	for round := range 400 {
		if round%50 == 25 {
			// As after a restart or a failover: the next batch's first
			// call loads the script for the others.
			if err := client.Do(context.Background(), client.B().ScriptFlush().Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}
		clock.advance(steps[rng.IntN(len(steps))])
		n := 1 + rng.IntN(6)
		datagrams := make([][]byte, n)
		for i := range datagrams {
			ip := fmt.Sprintf("192.0.2.%d", 1+rng.IntN(9))
			rcpts := make([]string, 1+rng.IntN(3))
			for j := range rcpts {
				rcpts[j] = pick(bob, carol, verp, "dave@example.com")
			}
			d := req(ip, pick(alice, "", "eve@example.net"), rcpts...)
			switch rng.IntN(12) {
			case 0:
				d = append(d, "Xjunk\x00"...) // a bad field after the recipients
			case 1:
				d = []byte("F" + alice + "\x00") // no client field
			case 2:
				d = []byte("I" + ip + "\x00Tbob@example.com\x00") // no sender field
			}
			datagrams[i] = d
		}
		type result struct {
			v   Verdict
			err error
		}
		var want, got []result
		for _, d := range datagrams {
			v, err := local.decideQmail(&kb, d)
			want = append(want, result{v, err})
		}
		pending := []int{}
		got = make([]result, n)
		for i, d := range datagrams {
			v, wait, err := remote.prepareQmailRemote(&kb, &batch[len(pending)], d)
			if wait {
				pending = append(pending, i)
				continue
			}
			got[i] = result{v, err}
		}
		store.decide(batch[:len(pending)], set.Policy)
		for j, i := range pending {
			v, err := remote.finishQmailRemote(&kb, &batch[j], datagrams[i])
			got[i] = result{v, err}
		}
		for i := range datagrams {
			if got[i] != want[i] {
				t.Fatalf("round %d, request %q: Redis decided %v (%v), locally %v (%v)",
					round, datagrams[i], got[i].v, got[i].err, want[i].v, want[i].err)
			}
			verdicts[want[i].v]++
		}
	}
	// The random requests reached every verdict.
	for _, v := range []Verdict{GreyNew, GreyTooSoon, GreyStale, AcceptKnownIP, AcceptRetried, AcceptBounce, AcceptWhitelisted} {
		if verdicts[v] == 0 {
			t.Errorf("no request was decided %v: %v", v, verdicts)
		}
	}
	if store.fallbacks.Load() != 0 || store.failures.Load() != 0 {
		t.Errorf("%d fallbacks, %d failures", store.fallbacks.Load(), store.failures.Load())
	}
}

// TestRedisRunsOnOneProcessor starts the daemon as its own process in
// Redis mode: it runs Go on one processor and says so, unless the
// GOMAXPROCS variable chooses.
func TestRedisRunsOnOneProcessor(t *testing.T) {
	port, _ := startRedis(t, 0)
	conf := filepath.Join(t.TempDir(), "greydaemon.toml")
	if err := os.WriteFile(conf, fmt.Appendf(nil, "redis_url = \"redis://127.0.0.1:%d/0\"\n", port), 0o644); err != nil {
		t.Fatal(err)
	}
	const line = "redis: running Go on one processor"
	for _, env := range []string{"", "2"} {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = os.Environ()
		if env != "" {
			cmd.Env = append(cmd.Env, "GOMAXPROCS="+env)
		} else {
			cmd.Env = slices.DeleteFunc(cmd.Env, func(v string) bool { return strings.HasPrefix(v, "GOMAXPROCS=") })
		}
		c := startChildCmd(t, cmd, "-c", conf, "127.0.0.1:0", filepath.Join(t.TempDir(), "state"))
		// Until the child has connected, the fallback answers; a request
		// decided in Redis leaves its key there. Each request is a new
		// triplet, so every answer is 0001 either way.
		conn := dial(t, c.addr)
		inRedis := false
		for i := 0; i < 100 && !inRedis; i++ {
			before := redisDo(t, port, "DBSIZE")
			if got := exchange(t, conn, req("192.0.2.1", alice, fmt.Sprintf("r%s-%d@rcpt.example", env, i)), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
				t.Fatalf("GOMAXPROCS=%q: reply %x, want 0001", env, got)
			}
			if inRedis = redisDo(t, port, "DBSIZE") != before; !inRedis {
				time.Sleep(100 * time.Millisecond)
			}
		}
		if !inRedis {
			t.Errorf("GOMAXPROCS=%q: no request was decided in Redis within 10 s", env)
		}
		if logged := strings.Contains(c.log.String(), line); logged != (env == "") {
			t.Errorf("GOMAXPROCS=%q: logged %q: %v\n%s", env, line, logged, c.log.String())
		}
		c.cmd.Process.Signal(syscall.SIGTERM)
		c.cmd.Wait()
	}
}

// redisDo sends one command to the Redis on port and returns the first
// line of its answer.
func redisDo(t *testing.T, port int, args ...string) string {
	t.Helper()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(c, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(c, "$%d\r\n%s\r\n", len(a), a)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(line)
}

// TestRedisBadValueHurtsNobody writes a value that is not a number into
// one client's known-IP key and turns one triplet's key into a list: the
// requests that touch them are decided in Redis as if the keys were absent
// (and the keys repaired), no request falls back, Redis is never marked
// down, and other clients are decided as usual.
func TestRedisBadValueHurtsNobody(t *testing.T) {
	port, _ := startRedis(t, 0)
	clock := newFakeClock()
	td := startRedisDaemon(t, port, clock)
	conn := dial(t, td.addr)
	ask := func(r []byte, want []byte) {
		t.Helper()
		if got := exchange(t, conn, r, 5*time.Second); !bytes.Equal(got, want) {
			t.Fatalf("reply %x, want %x", got, want)
		}
	}
	ask(req("192.0.2.1", alice, bob), []byte{0, 1})
	clock.advance(6 * time.Minute)
	ask(req("192.0.2.1", alice, bob), []byte{1, 3}) // passed: 192.0.2.1 is known
	ask(req("192.0.2.2", alice, carol), []byte{0, 1})
	ikeys := redisDo(t, port, "KEYS", "greydaemon:i:*")
	gkeys := redisDo(t, port, "KEYS", "greydaemon:g:*")
	if ikeys != "*1" || gkeys != "*2" {
		t.Fatalf("keys in Redis: %s known IPs, %s triplets", ikeys, gkeys)
	}
	var st Stats
	// The known IP's key holds "abc"; carol's triplet key becomes a list.
	var kb keyBuilder
	iKey := td.remote.key('i', td.g.ParseClient([]byte("192.0.2.1")).key)
	c2 := td.g.ParseClient([]byte("192.0.2.2"))
	gKey := td.remote.key('g', kb.triplet(c2.key, td.g.ParseSender(&kb, []byte(alice)).text, []byte(carol)))
	redisDo(t, port, "SET", iKey, "abc")
	redisDo(t, port, "DEL", gKey)
	redisDo(t, port, "RPUSH", gKey, "x")
	ask(req("192.0.2.1", alice, bob), []byte{1, 3})   // not known any more, but its triplet passed
	ask(req("192.0.2.2", alice, carol), []byte{0, 1}) // a new triplet again
	ask(req("192.0.2.3", alice, bob), []byte{0, 1})
	ask(req("192.0.2.1", alice, "dave@rcpt.example"), []byte{1, 2}) // known again: the key was repaired
	td.UpdateStats(&st)
	if st.Fallbacks != 0 || !st.RedisUp || st.RedisFailures != 0 {
		t.Errorf("fallbacks %d, redis up %v, failures %d; want 0, true, 0", st.Fallbacks, st.RedisUp, st.RedisFailures)
	}
	if got := redisDo(t, port, "TYPE", gKey); got != "+string" {
		t.Errorf("the triplet's key is a %s now, want a string again", got)
	}
	if log := td.errOut.String(); strings.Contains(log, "unavailable") {
		t.Errorf("Redis was marked down:\n%s", log)
	}
}

// TestRedisFallbackDeadlineAndBackoff stops Redis (SIGSTOP) under daemons
// with redis_fallback accept and tempfail and redis_timeout 100ms: the
// request that meets the stopped Redis is answered after its deadline,
// the ones after it without asking Redis (one failure, then a second of
// back-off), each with its fallback's verdict; the metrics say so (up 0,
// one call ok, the failures as errors, every fallback decision); and a
// grey triplet's key lives the resend window plus a minute.
func TestRedisFallbackDeadlineAndBackoff(t *testing.T) {
	for _, tt := range []struct {
		fallback string
		want     []byte
	}{{"accept", []byte{1, 3}}, {"tempfail", []byte{0, 1}}} {
		t.Run(tt.fallback, func(t *testing.T) {
			port, redis := startRedis(t, 0)
			cfg := defaultConfig()
			cfg.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", port)
			cfg.RedisFallback = tt.fallback
			cfg.RedisTimeout = Duration{100 * time.Millisecond}
			cfg.MetricsListen = "127.0.0.1:0"
			clock := newFakeClock()
			td := startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
			waitRedisConnected(t, td)
			conn := dial(t, td.addr)
			if got := exchange(t, conn, req("192.0.2.1", alice, bob), 5*time.Second); !bytes.Equal(got, []byte{0, 1}) {
				t.Fatalf("with Redis: %x", got)
			}
			var kb keyBuilder
			c := td.g.ParseClient([]byte("192.0.2.1"))
			key := td.remote.key('g', kb.triplet(c.key, td.g.ParseSender(&kb, []byte(alice)).text, []byte(bob)))
			if ttl := redisDo(t, port, "TTL", key); ttl != ":43260" && ttl != ":43259" {
				t.Errorf("grey triplet's TTL %s, want the resend window (43200 s) plus 60", ttl)
			}

			redis.Process.Signal(syscall.SIGSTOP)
			defer redis.Process.Signal(syscall.SIGCONT)
			start := time.Now()
			for i := range 20 {
				if got := exchange(t, conn, req("192.0.2.9", alice, fmt.Sprintf("r%d@x", i)), 2*time.Second); !bytes.Equal(got, tt.want) {
					t.Fatalf("request %d with Redis stopped: %x, want %x (redis_fallback = %s)", i, got, tt.want, tt.fallback)
				}
			}
			took := time.Since(start)
			var st Stats
			td.UpdateStats(&st)
			if took < 900*time.Millisecond && (st.RedisCalls != 2 || st.RedisFailures != 1) {
				t.Errorf("20 requests in %v with Redis stopped made %d calls, %d failed; want 2 and 1 (a second of back-off after the failure)", took, st.RedisCalls, st.RedisFailures)
			}
			if st.Fallbacks != 20 {
				t.Errorf("%d fallback decisions, want 20", st.Fallbacks)
			}
			text := scrape(t, td.addrs["metrics"])
			for series, want := range map[string]float64{
				"greydaemon_redis_up":                          0,
				`greydaemon_redis_calls_total{result="ok"}`:    1,
				`greydaemon_redis_calls_total{result="error"}`: float64(st.RedisFailures),
				"greydaemon_redis_fallback_decisions_total":    20,
				"greydaemon_max_entries":                       2_000_000,
			} {
				if got := metricValue(text, series); got != want {
					t.Errorf("%s = %v, want %v", series, got, want)
				}
			}
		})
	}
}

// TestImportRedisGreylistd copies a snapshot's greylistd entries into
// Redis: a daemon deciding there, asked over its greylistd socket, finds
// them on their lists.
func TestImportRedisGreylistd(t *testing.T) {
	port, _ := startRedis(t, 0)
	clock := newFakeClock()
	local, sock := startListDaemon(t, clock, nil)
	askSocket(t, sock, "add --black spammer.example", true)
	askSocket(t, sock, "update 192.0.2.1 a@b c@d", true)
	if err := local.stop(t); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(t.TempDir(), "g.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("redis_url = \"redis://127.0.0.1:%d/0\"\n", port)), 0o644)
	var out bytes.Buffer
	if err := importRedisCommand([]string{"-c", conf, local.set.StateFile}, &out, clock.now); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "and 2 greylistd entries") {
		t.Fatalf("output %q", out.String())
	}
	cfg := defaultConfig()
	cfg.RedisURL = fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	cfg.GreylistdListen = filepath.Join(t.TempDir(), "greylistd.sock")
	td := startTestDaemon(t, settingsOf(t, cfg), clock.now, nil)
	waitRedisConnected(t, td)
	for request, want := range map[string]string{"status spammer.example": "black", "status 192.0.2.1 a@b c@d": "grey", "status other": "unseen"} {
		if got := askSocket(t, cfg.GreylistdListen, request, true); got != want {
			t.Errorf("%q after import-redis: %q, want %q", request, got, want)
		}
	}
}
