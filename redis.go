package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
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
// entries' TTL, and "1" if a bounce-rule recipient ended the request. It
// returns the verdict's two bytes as a number and the last triplet's age.
const decideScript = `
local now = tonumber(ARGV[1])
local lifetime, mindelay, window, greyttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local last = redis.call('GET', KEYS[1])
if last then
  local a = now - tonumber(last)
  if a < 0 then a = 0 end
  if a < lifetime then
    redis.call('SET', KEYS[1], now, 'EX', lifetime)
    return {258, 0}
  end
end
local v, age, retry = 259, 0, false
for i = 2, #KEYS do
  local first = redis.call('GET', KEYS[i])
  local a = -1
  if first then
    a = now - tonumber(first)
    if a < 0 then a = 0 end
  end
  if a < 0 or a >= window then
    redis.call('SET', KEYS[i], now, 'EX', greyttl)
    if a < 0 then v = 1 else v = 3 end
    age = 0
  elseif a < mindelay then
    v, age = 2, a
  else
    retry, age = true, a
  end
end
if retry then redis.call('SET', KEYS[1], now, 'EX', lifetime) end
if ARGV[6] == '1' then v = 260 elseif ARGV[7] == '1' then v = 0 end
return {v, age}
`

// A redisStore decides requests in Redis. It is safe for concurrent use;
// rueidis pipelines the calls of concurrent readers on one connection.
type redisStore struct {
	opt      rueidis.ClientOption
	prefix   string
	timeout  time.Duration
	fallback string
	log      *logger
	script   *rueidis.Lua

	client    atomic.Pointer[rueidis.Client] // nil until connected
	downUntil atomic.Int64                   // unix nanoseconds: do not try Redis before
	down      atomic.Bool                    // for logging each change once

	calls, failures, fallbacks atomic.Uint64

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
		fallback: set.RedisFallback, log: log, script: rueidis.NewLuaScript(decideScript), stop: make(chan struct{})}
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

// close stops the store.
func (s *redisStore) close() {
	close(s.stop)
	s.done.Wait()
	if c := s.client.Load(); c != nil {
		(*c).Close()
	}
}

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

// decide decides a request from client whose recipients before a
// bounce-rule one have the given triplet keys. It returns the verdict and
// the last triplet's age, or errRedisDown.
func (s *redisStore) decide(client clientKey, triplets []tripletKey, bounce, malformed bool, now uint32, p Policy) (Verdict, uint32, error) {
	cp := s.client.Load()
	if cp == nil || time.Now().UnixNano() < s.downUntil.Load() {
		return 0, 0, errRedisDown
	}
	keys := make([]string, 0, 1+len(triplets))
	keys = append(keys, s.key('i', client))
	for _, t := range triplets {
		keys = append(keys, s.key('g', t))
	}
	flag := func(b bool) string {
		if b {
			return "1"
		}
		return "0"
	}
	grey := uint64(p.ResendWindow) + staleGrace
	args := []string{strconv.FormatUint(uint64(now), 10), strconv.FormatUint(uint64(p.KnownIPLifetime), 10),
		strconv.FormatUint(uint64(p.MinResendDelay), 10), strconv.FormatUint(uint64(p.ResendWindow), 10),
		strconv.FormatUint(grey, 10), flag(bounce), flag(malformed)}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	vals, err := s.script.Exec(ctx, *cp, keys, args).AsIntSlice()
	cancel()
	s.calls.Add(1)
	if err != nil || len(vals) != 2 {
		s.failures.Add(1)
		if err == nil {
			err = fmt.Errorf("the script answered %v", vals)
		}
		s.setDown(err)
		return 0, 0, errRedisDown
	}
	if s.down.Swap(false) {
		s.log.Infof("redis: answering again; deciding in Redis")
	}
	return Verdict(vals[0]), uint32(max(vals[1], 0)), nil
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
	if set.RedisURL == "" && len(set.RedisSentinels) == 0 {
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
	s := &redisStore{prefix: set.RedisPrefix}
	exp := set.Policy.expiry()
	t := uint32(max(now().Unix(), 0))
	var batch rueidis.Commands
	var known, grey, skipped int
	var sendErr error
	send := func() {
		for _, r := range client.DoMulti(context.Background(), batch...) {
			if err := r.Error(); err != nil && !rueidis.IsRedisNil(err) && sendErr == nil {
				sendErr = err
			}
		}
		batch = batch[:0]
	}
	st, err := decodeStateFile(data, func(kind int, k [16]byte, seen uint32) bool {
		seen, _ = clampFuture(seen, t)
		var key string
		var left uint32
		switch kind {
		case blockKnown:
			if age(t, seen) >= exp.knownLifetime {
				skipped++
				return false
			}
			ck := clientKey(k)
			if addr, ok := ck.addr(); ok {
				ck = clientKeyFromAddr(set.Grouping.group(addr))
			}
			key, left = s.key('i', ck), exp.knownLifetime-age(t, seen)
			known++
		default:
			if age(t, seen) >= exp.greyLifetime {
				skipped++
				return false
			}
			key, left = s.key('g', k), exp.greyLifetime-age(t, seen)
			grey++
		}
		batch = append(batch, client.B().Set().Key(key).Value(strconv.FormatUint(uint64(seen), 10)).Nx().ExSeconds(int64(left)).Build())
		if len(batch) == 1000 {
			send()
		}
		return true
	}, nil) // greylistd entries stay in each daemon's own table
	if err != nil {
		return fmt.Errorf("%q: %w", path, err)
	}
	if len(batch) > 0 {
		send()
	}
	if sendErr != nil {
		return fmt.Errorf("import-redis: %w", sendErr)
	}
	fmt.Fprintf(stdout, "greydaemon: copied %d known IPs and %d grey triplets from %s (%s format) to Redis; %d expired left out\n",
		known, grey, path, st.format, skipped)
	return nil
}
