package main

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"strconv"

	"github.com/redis/rueidis"
)

// This file keeps greylistd's entries (greylistd.go) in Redis when the
// daemon decides there, so that an Exim host's retry at another MX host
// finds the entry its first attempt made, as qmail's and Postfix's
// triplets do.

// The operations of listScript, its first argument.
const (
	listOpUpdate = "u" // check, and record the request (update)
	listOpCheck  = "c" // the list the entry is on now, recording nothing
	listOpStatus = "s" // the list the entry is on, 0 for none
	listOpAdd    = "a" // record the request on the list given (add)
	listOpDelete = "d" // remove it, returning its list (delete)
)

// listScript is greylistd's rules for one entry in Lua, as currentList and
// addToList are in Go. KEYS[1] is the entry, a string "list first last
// count"; ARGV is the operation, now, greylistd_retry_min, the grey and the
// white/black lifetimes, and the list for add. An entry whose last sighting
// is older than its lifetime counts as absent (Redis's TTL removes it
// too), and so does a value of any other shape, which is deleted. It
// returns the list the entry is on after the operation (0 for none), plus
// 16 when the operation put it on that list anew.
const listScript = `
local now, retrymin = tonumber(ARGV[2]), tonumber(ARGV[3])
local ok, raw = pcall(redis.call, 'GET', KEYS[1])
local st, first, last, count
if ok and raw then
  st, first, last, count = string.match(raw, '^(%d) (%d+) (%d+) (%d+)$')
end
if st then
  st, first, last, count = tonumber(st), tonumber(first), tonumber(last), tonumber(count)
  local limit = tonumber(ARGV[5])
  if st == 2 then limit = tonumber(ARGV[4]) end
  if now - last > limit then st = nil end
elseif not ok or raw then
  redis.call('DEL', KEYS[1])
end
local op = ARGV[1]
if op == 'd' then
  if st then redis.call('DEL', KEYS[1]) return st end
  return 0
end
if op == 's' then return st or 0 end
local cur = st
if not st then cur = 2
elseif st == 2 and first + retrymin < now then cur = 1 end
if op == 'c' then return cur end
if op == 'a' then cur = tonumber(ARGV[6]) end
local moved = 0
if st == cur then
  last, count = now, count + 1
else
  first, last, count, moved = now, now, 1, 16
end
local ttl = tonumber(ARGV[5])
if cur == 2 then ttl = tonumber(ARGV[4]) end
redis.call('SET', KEYS[1], cur .. ' ' .. first .. ' ' .. last .. ' ' .. count, 'EX', ttl + 1)
return cur + moved
`

// listScriptSHA1 is the name Redis knows listScript by once loaded.
var listScriptSHA1 = func() string {
	sum := sha1.Sum([]byte(listScript))
	return hex.EncodeToString(sum[:])
}()

// listOp runs the operation op of listScript on the entry k at now, with
// the limits of p, and state as the list for add. It returns the list the
// entry is on afterwards (0 for none) and whether the operation put it
// there anew; an error when Redis could not answer.
func (s *redisStore) listOp(op string, k listKey, state listState, now uint32, p Policy) (listState, bool, error) {
	cp := s.client.Load()
	if cp == nil || s.downNow() {
		return 0, false, errRedisDown
	}
	c := *cp
	key := s.key('l', k)
	args := []string{op, strconv.FormatUint(uint64(now), 10), strconv.FormatUint(uint64(p.ListRetryMin), 10),
		strconv.FormatUint(uint64(p.ListRetryMax), 10), strconv.FormatUint(uint64(p.ListExpire), 10),
		strconv.Itoa(int(state))}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	s.calls.Add(1)
	res := c.Do(ctx, c.B().Evalsha().Sha1(listScriptSHA1).Numkeys(1).Key(key).Arg(args...).Build())
	if e, ok := rueidis.IsRedisErr(res.Error()); ok && e.IsNoScript() {
		res = c.Do(ctx, c.B().Eval().Script(listScript).Numkeys(1).Key(key).Arg(args...).Build())
	}
	x, err := res.AsInt64()
	if err != nil {
		s.failures.Add(1)
		if !requestError(err) {
			s.setDown(err)
		}
		return 0, false, err
	}
	s.up()
	return listState(x & 15), x&16 != 0, nil
}

// listFallback counts a greylistd request that Redis could not decide and
// returns the list redis_fallback puts it on (white for accept, grey for
// tempfail), or false to decide it in the local table.
func (s *redisStore) listFallback() (listState, bool) {
	switch v, ok := s.fallbackVerdict(); {
	case !ok:
		return 0, false
	case v == GreyNew:
		return listGrey, true
	}
	return listWhite, true
}
