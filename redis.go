package main

import (
	"cmp"
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// This file keeps the greylist in Redis, so that several MX hosts share
// one: a sender greylisted by one host and retrying at another passes
// there. Each request is decided atomically in Redis, in one round trip, by
// a Lua script that runs PROTOCOL.md §4 steps 3 and 5 (the whitelist,
// step 2, stays local). Redis's TTLs expire the entries instead of the
// sweeper. When Redis cannot answer within the deadline, the request is
// decided by redis_fallback, and Redis is tried again a second later.

// decideScript is §4 in Lua. KEYS[1] is the client's known-IP key, KEYS[2..]
// the triplets of the recipients before a bounce-rule recipient; ARGV is
// now, the known-IP lifetime, the minimum delay, the resend window, the grey
// entries' TTL, "1" if a bounce-rule recipient ended the request, and "1" if
// a bad field did. It returns the verdict's two bytes times 2^32 plus the
// last triplet's age: one number, since a table costs Redis more to return.
// It hands Redis the arguments' strings, not Lua numbers, for the same
// reason (a number costs a conversion each time). A key that holds
// anything but a number (written by hand, or by something else sharing the
// prefix; of another type even) counts as absent and is deleted or
// overwritten: one bad value must not fail the requests of every client.
const decideScript = `
local function stamp(key)
  local ok, v = pcall(redis.call, 'GET', key)
  local n = ok and v and tonumber(v)
  if ok and v and not n then redis.call('DEL', key) end
  if not ok then redis.call('DEL', key) end
  return n
end
local now = tonumber(ARGV[1])
local last = stamp(KEYS[1])
if last then
  local a = now - last
  if a < 0 then a = 0 end
  if a < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 258 * 4294967296
  end
end
local mindelay, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local v, age, retry = 259, 0, false
for i = 2, #KEYS do
  local first = stamp(KEYS[i])
  local a = -1
  if first then
    a = now - first
    if a < 0 then a = 0 end
  end
  if a < 0 or a >= window then
    redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[5])
    if a < 0 then v = 1 else v = 3 end
    age = 0
  elseif a < mindelay then
    v, age = 2, a
  else
    retry, age = true, a
  end
end
if retry then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
if ARGV[6] == '1' then v = 260 elseif ARGV[7] == '1' then v = 0 end
return v * 4294967296 + age
`

// decideScriptSHA1 is the name Redis knows decideScript by once loaded.
var decideScriptSHA1 = func() string {
	sum := sha1.Sum([]byte(decideScript))
	return hex.EncodeToString(sum[:])
}()

// A redisStore decides requests in Redis. It is safe for concurrent use;
// rueidis pipelines the calls of concurrent readers on one connection.
type redisStore struct {
	opt      rueidis.ClientOption
	prefix   string
	timeout  time.Duration
	fallback string
	log      *logger

	client    atomic.Pointer[rueidis.Client] // nil until connected
	downUntil atomic.Int64                   // unix nanoseconds: do not try Redis before
	down      atomic.Bool                    // for logging each change once

	calls, failures, fallbacks atomic.Uint64
	requestFailures            atomic.Uint64 // of single requests (see requestError)

	stop chan struct{}
	done sync.WaitGroup
}

// redisOption turns the settings into a rueidis client option.
func redisOption(set *Settings) (rueidis.ClientOption, error) {
	var opt rueidis.ClientOption
	if set.RedisURL != "" {
		var err error
		if opt, err = rueidis.ParseURL(set.RedisURL); err != nil {
			return opt, fmt.Errorf("bad redis_url: %w", err)
		}
	} else {
		opt.InitAddress = set.RedisSentinels
		opt.Sentinel = rueidis.SentinelOption{MasterSet: set.RedisMaster}
	}
	opt.DisableCache = true // the script reads and writes; nothing to cache
	opt.Dialer.Timeout = set.RedisTimeout.Duration
	opt.ConnWriteTimeout = set.RedisTimeout.Duration
	return opt, nil
}

// newRedisStore returns a store that connects in the background, trying
// again every second until Redis answers.
func newRedisStore(set *Settings, log *logger) (*redisStore, error) {
	opt, err := redisOption(set)
	if err != nil {
		return nil, err
	}
	s := &redisStore{opt: opt, prefix: set.RedisPrefix, timeout: set.RedisTimeout.Duration,
		fallback: set.RedisFallback, log: log, stop: make(chan struct{})}
	s.done.Go(s.connect)
	return s, nil
}

// connect makes the client; rueidis reconnects it by itself afterwards.
func (s *redisStore) connect() {
	for attempt := 0; ; attempt++ {
		c, err := rueidis.NewClient(s.opt)
		if err == nil {
			s.client.Store(&c)
			s.log.Infof("redis: connected to %v", s.opt.InitAddress)
			return
		}
		if attempt == 0 {
			s.setDown(err)
		}
		select {
		case <-s.stop:
			return
		case <-time.After(time.Second):
		}
	}
}

// close stops the store, waiting at most redisCloseTimeout: a Redis that
// accepted a connection but never answers (stopped, or hung) must not
// hold up the shutdown.
func (s *redisStore) close() {
	close(s.stop)
	closed := make(chan struct{})
	go func() {
		s.done.Wait()
		if c := s.client.Load(); c != nil {
			(*c).Close()
		}
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(redisCloseTimeout):
		s.log.Warnf("redis: not closed within %v; leaving the connection to the exit", redisCloseTimeout)
	}
}

// redisCloseTimeout bounds how long the shutdown waits to close Redis.
const redisCloseTimeout = 2 * time.Second

// setDown records a failure: Redis is not tried again for a second, and
// the first failure after a success is logged.
func (s *redisStore) setDown(err error) {
	s.downUntil.Store(time.Now().Add(time.Second).UnixNano())
	if !s.down.Swap(true) {
		s.log.Errorf("redis: unavailable (%v); deciding by redis_fallback = %q until it answers again", err, s.fallback)
	}
}

// key returns the Redis key of a table key.
func (s *redisStore) key(kind byte, k [16]byte) string {
	var b [64]byte
	out := append(b[:0], s.prefix...)
	out = append(out, kind, ':')
	out = hex.AppendEncode(out, k[:])
	return string(out)
}

// errRedisDown means Redis was not asked, or did not answer in time.
var errRedisDown = errors.New("redis unavailable")

// decide decides the requests in one round trip (rueidis sends their
// scripts in one write, and Redis answers them in one), filling in each
// one's result. When Redis is down or does not answer within the
// deadline, each gets errRedisDown.
func (s *redisStore) decide(reqs []remoteRequest, p Policy) {
	cp := s.client.Load()
	if cp == nil || s.downNow() {
		for i := range reqs {
			reqs[i].err = errRedisDown
		}
		return
	}
	results := s.roundTrip(*cp, reqs, p)
	var firstErr error
	for i, res := range results {
		if err := s.finish(&reqs[i], res); err != nil && !requestError(err) {
			firstErr = cmp.Or(firstErr, err)
		}
	}
	if firstErr != nil {
		s.setDown(firstErr)
	} else {
		s.up()
	}
}

// roundTrip sends the scripts of reqs, decided under p, in one write and
// returns Redis's answers. A Redis that restarted, or failed over, has
// forgotten the script: the calls it refused are sent again with the
// script whole once, ahead of the others on the same connection, which
// also loads it for them.
func (s *redisStore) roundTrip(c rueidis.Client, reqs []remoteRequest, p Policy) []rueidis.RedisResult {
	policy := [4]string{strconv.FormatUint(uint64(p.KnownIPLifetime), 10), strconv.FormatUint(uint64(p.MinResendDelay), 10),
		strconv.FormatUint(uint64(p.ResendWindow), 10), strconv.FormatUint(uint64(p.ResendWindow)+staleGrace, 10)}
	build := func(r *remoteRequest, script bool) rueidis.Completed {
		keys := make([]string, 0, 1+len(r.triplets))
		keys = append(keys, s.key('i', r.client))
		for _, t := range r.triplets {
			keys = append(keys, s.key('g', t))
		}
		args := []string{strconv.FormatUint(uint64(r.now), 10), policy[0], policy[1], policy[2], policy[3],
			flagArg(r.bounce), flagArg(r.malformed)}
		if script {
			return c.B().Eval().Script(decideScript).Numkeys(int64(len(keys))).Key(keys...).Arg(args...).Build()
		}
		return c.B().Evalsha().Sha1(decideScriptSHA1).Numkeys(int64(len(keys))).Key(keys...).Arg(args...).Build()
	}
	cmds := make(rueidis.Commands, len(reqs))
	for i := range reqs {
		cmds[i] = build(&reqs[i], false)
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	results := c.DoMulti(ctx, cmds...)
	var again []int
	for i, res := range results {
		if e, ok := rueidis.IsRedisErr(res.Error()); ok && e.IsNoScript() {
			again = append(again, i)
		}
	}
	if len(again) > 0 {
		cmds = cmds[:0]
		for n, i := range again {
			cmds = append(cmds, build(&reqs[i], n == 0))
		}
		for n, res := range c.DoMulti(ctx, cmds...) {
			results[again[n]] = res
		}
	}
	return results
}

// flagArg is a script's argument for a flag: "1" or "0".
func flagArg(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

// finish fills in r from Redis's answer res, counting the call, and
// returns the call's error, if any: r then gets errRedisDown. A failure of
// the request's own (requestError) is logged, rarely, here.
func (s *redisStore) finish(r *remoteRequest, res rueidis.RedisResult) error {
	x, err := res.AsInt64()
	s.calls.Add(1)
	if err == nil && x >= 0 {
		r.verdict, r.age, r.err = Verdict(x>>32), uint32(x), nil
		return nil
	}
	s.failures.Add(1)
	r.err = errRedisDown
	if err == nil {
		err = fmt.Errorf("the script answered %d", x)
	}
	if requestError(err) && rarely(&s.requestFailures, 1) {
		// This request's keys, not Redis: the others stand.
		s.log.Errorf("redis: one request failed (%v); it is decided by redis_fallback = %q, Redis stays in use", err, s.fallback)
	}
	return err
}

// downNow reports whether Redis is not to be asked now, after a failure.
func (s *redisStore) downNow() bool { return time.Now().UnixNano() < s.downUntil.Load() }

// up records that Redis answered, and logs it after a failure.
func (s *redisStore) up() {
	if s.down.Swap(false) {
		s.log.Infof("redis: answering again; deciding in Redis")
	}
}

// requestError reports whether err, a call's failure, is the request's own
// (Redis ran the script, and the script failed on this request's keys)
// rather than Redis's: a timeout, a lost connection, or Redis loading,
// busy, read-only or out of memory.
func requestError(err error) bool {
	e, ok := rueidis.IsRedisErr(err)
	if !ok {
		return false
	}
	msg := e.Error()
	return strings.HasPrefix(msg, "WRONGTYPE") ||
		strings.HasPrefix(msg, "ERR") && strings.Contains(msg, "script") && !strings.Contains(msg, "OOM")
}

// fallbackVerdict counts a request that Redis could not decide and
// returns redis_fallback's verdict for it, or false to decide it locally.
func (s *redisStore) fallbackVerdict() (Verdict, bool) {
	s.fallbacks.Add(1)
	switch s.fallback {
	case fallbackAccept:
		return AcceptRetried, true
	case fallbackTempfail:
		return GreyNew, true
	}
	return 0, false
}

// importRedisCommand is `greydaemon import-redis [-c FILE] [flags] savefile`:
// it copies the entries of a snapshot or a Perl save file that have not
// expired into the Redis that the settings name, so that a site moving
// from one host to several keeps its known IPs and grey triplets. An entry
// Redis holds already is left as it is. Each key gets the TTL that is left
// of its lifetime.
func importRedisCommand(args []string, stdout io.Writer, now func() time.Time) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: import-redis needs the state file to copy", errUsage)
	}
	path, args := args[len(args)-1], args[:len(args)-1]
	set, err := parseCommandLine(args)
	if err != nil {
		return err
	}
	if !set.usesRedis() {
		return fmt.Errorf("import-redis: no redis_url or redis_sentinels in the settings")
	}
	data, err := readStateFile(path)
	if err != nil {
		return err
	}
	opt, err := redisOption(set)
	if err != nil {
		return err
	}
	opt.Dialer.Timeout = 5 * time.Second
	client, err := rueidis.NewClient(opt)
	if err != nil {
		return fmt.Errorf("import-redis: cannot connect to Redis: %w", err)
	}
	defer client.Close()
	cp := &redisCopier{client: client, store: &redisStore{prefix: set.RedisPrefix}, set: set,
		exp: set.Policy.expiry(), now: uint32(max(now().Unix(), 0))}
	st, err := decodeStateFile(data, cp.add, cp.addList)
	if err != nil {
		return fmt.Errorf("%q: %w", path, err)
	}
	cp.send()
	if cp.err != nil {
		return fmt.Errorf("import-redis: %w", cp.err)
	}
	fmt.Fprintf(stdout, "greydaemon: copied %d known IPs, %d grey triplets and %d greylistd entries from %s (%s format) to Redis; %d expired left out\n",
		cp.known, cp.grey, cp.lists, path, st.format, cp.skipped)
	return nil
}

// A redisCopier copies a state file's entries into Redis for import-redis:
// each that has not expired, with the TTL left of its lifetime, unless
// Redis holds the key already; in batches of a thousand.
type redisCopier struct {
	client rueidis.Client
	store  *redisStore // for its keys
	set    *Settings
	exp    expiry
	now    uint32

	batch                       rueidis.Commands
	known, grey, lists, skipped int
	err                         error // the first that Redis answered
}

// add queues a known IP or a grey triplet.
func (cp *redisCopier) add(kind int, k [16]byte, seen uint32) bool {
	seen, _ = clampFuture(seen, cp.now)
	lifetime := cp.exp.greyLifetime
	if kind == blockKnown {
		lifetime = cp.exp.knownLifetime
	}
	if age(cp.now, seen) >= lifetime {
		cp.skipped++
		return false
	}
	var key string
	if kind == blockKnown {
		ck := clientKey(k)
		if addr, ok := ck.addr(); ok {
			ck = clientKeyFromAddr(cp.set.Grouping.group(addr))
		}
		key = cp.store.key('i', ck)
		cp.known++
	} else {
		key = cp.store.key('g', k)
		cp.grey++
	}
	cp.queue(key, strconv.FormatUint(uint64(seen), 10), lifetime-age(cp.now, seen))
	return true
}

// addList queues a greylistd entry, in the form listScript keeps.
func (cp *redisCopier) addList(k listKey, e listEntry) bool {
	if e.expired(cp.now, cp.exp) {
		cp.skipped++
		return false
	}
	lifetime := cp.exp.listLifetime
	if e.state == listGrey {
		lifetime = cp.exp.listGreyLifetime
	}
	value := fmt.Sprintf("%d %d %d %d", e.state, e.first, e.last, e.count)
	cp.queue(cp.store.key('l', k), value, lifetime-age(cp.now, e.last)+1)
	cp.lists++
	return true
}

// queue adds a SET NX with a TTL of ttl seconds, and sends the batch once
// it is full.
func (cp *redisCopier) queue(key, value string, ttl uint32) {
	cp.batch = append(cp.batch, cp.client.B().Set().Key(key).Value(value).Nx().ExSeconds(int64(max(ttl, 1))).Build())
	if len(cp.batch) == 1000 {
		cp.send()
	}
}

// send sends the queued commands.
func (cp *redisCopier) send() {
	if len(cp.batch) == 0 {
		return
	}
	for _, r := range cp.client.DoMulti(context.Background(), cp.batch...) {
		if err := r.Error(); err != nil && !rueidis.IsRedisNil(err) && cp.err == nil {
			cp.err = err
		}
	}
	cp.batch = cp.batch[:0]
}
