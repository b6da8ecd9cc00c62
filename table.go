package main

import (
	"encoding/binary"
	"runtime"
	"sync"
	"sync/atomic"
)

// A table holds greydaemon's state: the known-IP table (client key to the
// unix second it was last seen) and the grey-triplet table (triplet key to
// the unix second it was first seen).
//
// The table is split into a power-of-two number of shards, each with its own
// lock; a key's shard is picked by the low bits of its hash. A shard's
// known IPs and grey triplets are in fpMaps (fptable.go): open-addressing
// tables outside the Go heap, 24 to 30 bytes an entry. Every operation holds
// one shard lock for a few map operations and does no I/O, logging or
// allocation under it, except that an insert may start or advance the
// growth of a map (a step moves 64 groups: tens of microseconds).
//
// The table enforces a hard cap on the number of entries (known IPs plus
// grey triplets) per shard. A shard that is full evicts before it inserts:
// first expired entries, then the oldest grey triplets, and only when no grey
// triplets remain, the least recently seen known IPs.
//
// A table is safe for concurrent use. It does not read the clock: every
// operation takes the current time from its caller.
type table struct {
	shards   []shard
	mask     uint64
	shardCap int // entries per shard, known IPs and grey triplets together

	evicted atomic.Uint64 // entries dropped to respect the cap
	expired atomic.Uint64 // entries dropped by sweeps because they expired
	clamped atomic.Uint64 // times found in the future and set to now
	// unretried counts the grey triplets whose time ended (dropped as
	// expired, or restarted as stale) without a retry that passed; only
	// those first seen at countFrom or later, since the table does not
	// know which triplets loaded from a state file had passed.
	unretried atomic.Uint64
	countFrom atomic.Uint32
}

// A shard is one lock-striped part of a table. The padding keeps two
// shards' locks out of one cache line.
type shard struct {
	mu    sync.RWMutex
	known fpMap // client key -> last seen
	grey  fpMap // triplet key -> first seen
	// passed holds the grey triplets that passed a retry, with their first
	// seen time (a triplet restarted later is another one).
	passed fpMap
	// lists holds greylistd's entries (greylistd.go); nil until the first.
	lists map[listKey]listEntry
	_     [64]byte
}

// expiry says when entries stop counting. Times are whole seconds: an entry
// whose age is a or more is expired when a >= the limit, which for integer
// ages is the Perl daemon's age < limit test with fractional limits rounded
// up.
type expiry struct {
	knownLifetime uint32 // a known IP not seen for this long is forgotten
	greyLifetime  uint32 // a grey triplet this old may be dropped

	// greylistd's entries go, as greylistd drops them, when their last
	// sighting is more than this long ago (strictly).
	listGreyLifetime uint32 // on the grey list: greylistd_retry_max
	listLifetime     uint32 // on the white or black list: greylistd_expire
}

// A listKey is the fingerprint of a greylistd data string (greylistd.go).
// greylistd's entries live in a map of their own, so a data string and a
// qmail triplet can never be taken for one another.
type listKey [16]byte

// shardHash uses bits of the fingerprint itself, which are uniform.
func (k listKey) shardHash() uint64 { return binary.LittleEndian.Uint64(k[8:]) }

// A listState is the list a greylistd entry is on.
type listState uint8

const (
	listWhite listState = 1
	listGrey  listState = 2
	listBlack listState = 3
)

// A listEntry is a greylistd data string's place: its list, the unix seconds
// it was first and last seen on that list, and how many requests it matched
// there (greylistd's three numbers).
type listEntry struct {
	first, last, count uint32
	state              listState
}

// expired reports whether e is gone at now under exp, as greylistd's
// expireKeys decides: last seen more than the lifetime ago.
func (e listEntry) expired(now uint32, exp expiry) bool {
	limit := exp.listLifetime
	if e.state == listGrey {
		limit = exp.listGreyLifetime
	}
	return age(now, e.last) > limit
}

// defaultShards is the number of shards of a table of the default size:
// enough that cores rarely meet on one lock.
const defaultShards = 256

// shardsFor returns the number of shards for a table capped at maxEntries:
// defaultShards for the default size; more for large caps, so that a full
// shard holds about 8192 entries and a sweep or an eviction scan holds its
// lock for well under a millisecond; fewer for small caps, so that every
// shard holds at least minShardCap entries and eviction, which works per
// shard, keeps the table close to the cap.
func shardsFor(maxEntries int) int {
	n := defaultShards
	for n < 1<<16 && maxEntries/n > 8192 {
		n <<= 1
	}
	for n > 1 && maxEntries/n < minShardCap {
		n >>= 1
	}
	return n
}

// minShardCap is the smallest per-shard cap that shardsFor chooses.
const minShardCap = 64

// evictFraction is the part of a full shard that one eviction frees, so
// that the cost of the scan is shared by that many inserts. A full table
// holds between 1-1/evictFraction and all of its capacity.
const evictFraction = 16

// clockTolerance is how far in the future a time may be before the table
// treats it as now: a save file from a host whose clock ran ahead, or a
// clock that stepped back, must not leave entries that never age.
const clockTolerance = 60

// newTable returns an empty table with nShards shards (rounded up to a power
// of two) holding at most maxEntries entries in all (rounded down so that
// every shard holds the same number; with shardsFor's shard counts, by less
// than 2%).
func newTable(nShards, maxEntries int) *table {
	n := 1
	for n < nShards {
		n <<= 1
	}
	per := max(maxEntries/n, 1)
	t := &table{shards: make([]shard, n), mask: uint64(n - 1), shardCap: per}
	// The maps' memory is not the Go heap's: give it back when the table
	// goes. (The daemon's table lives as long as the process.)
	runtime.AddCleanup(t, func(shards []shard) {
		for i := range shards {
			shards[i].known.free()
			shards[i].grey.free()
			shards[i].passed.free()
		}
	}, t.shards)
	return t
}

// capacity returns the most entries the table holds.
func (t *table) capacity() int { return t.shardCap * len(t.shards) }

func (t *table) shardFor(h uint64) *shard { return &t.shards[h&t.mask] }

// refreshKnown reports whether client is a known IP seen less than lifetime
// seconds before now. If so it sets the client's last-seen time to now (the
// window slides).
func (t *table) refreshKnown(client clientKey, now, lifetime uint32) bool {
	s := t.shardFor(client.shardHash())
	k := (*[16]byte)(&client)
	s.mu.RLock()
	last, ok := s.known.get(k)
	s.mu.RUnlock()
	if !ok || age(now, last) >= lifetime {
		return false
	}
	s.mu.Lock()
	// Another goroutine may have refreshed it meanwhile; a later time wins.
	if last, ok = s.known.get(k); ok && now > last {
		s.known.set(k, now)
	}
	s.mu.Unlock()
	return ok
}

// markKnown records client as known, last seen at now.
func (t *table) markKnown(client clientKey, now uint32, exp expiry) {
	s := t.shardFor(client.shardHash())
	var evicted int
	k := (*[16]byte)(&client)
	s.mu.Lock()
	if _, ok := s.known.get(k); ok {
		s.known.set(k, now)
	} else {
		evicted = s.makeRoomLocked(t, now, exp)
		s.known.insert(k, now)
	}
	s.mu.Unlock()
	if evicted > 0 {
		t.evicted.Add(uint64(evicted))
	}
}

// A greyState is what observeTriplet found.
type greyState uint8

const (
	greyNew     greyState = iota // unknown triplet, now recorded
	greyTooSoon                  // known, younger than the minimum delay
	greyRetryOK                  // known, retried within the resend window
	greyStale                    // known but past the window; its clock restarted
)

// observeTriplet looks the triplet up and updates it as the Perl daemon
// does: an unknown triplet is recorded with first-seen now; one older than
// window is restarted at now; any other is left as it is. It returns what it
// found and the triplet's first-seen time (now for a new or restarted one).
func (t *table) observeTriplet(k tripletKey, now, minDelay, window uint32, exp expiry) (greyState, uint32) {
	s := t.shardFor(k.shardHash())
	key := (*[16]byte)(&k)
	// Retries that change nothing (too soon, good) need only the read lock.
	s.mu.RLock()
	first, ok := s.grey.get(key)
	marked := false
	if ok {
		p, pok := s.passed.get(key)
		marked = pok && p == first
	}
	s.mu.RUnlock()
	if a := age(now, first); ok && a < window {
		if a < minDelay {
			return greyTooSoon, first
		}
		if !marked {
			s.markPassed(key, first)
		}
		return greyRetryOK, first
	}
	var evicted int
	state := greyNew
	s.mu.Lock()
	first, ok = s.grey.get(key)
	seen := now
	switch a := age(now, first); {
	case !ok:
		evicted = s.makeRoomLocked(t, now, exp)
		s.grey.insert(key, now)
	case a < minDelay:
		state, seen = greyTooSoon, first
	case a < window:
		state, seen = greyRetryOK, first
		s.passed.set(key, first)
	default:
		if s.endGrey(key, first, t.countFrom.Load()) {
			t.unretried.Add(1)
		}
		s.grey.set(key, now)
		state = greyStale
	}
	s.mu.Unlock()
	if evicted > 0 {
		t.evicted.Add(uint64(evicted))
	}
	return state, seen
}

// markPassed records that the grey triplet key, first seen at first,
// passed a retry (unless it changed meanwhile).
func (s *shard) markPassed(key *[16]byte, first uint32) {
	s.mu.Lock()
	if v, ok := s.grey.get(key); ok && v == first {
		s.passed.set(key, first)
	}
	s.mu.Unlock()
}

// endGrey forgets that the grey triplet key, first seen at first, passed,
// as its time ends, and reports whether it ended without a retry that
// passed, counting only triplets first seen at from or later. The shard's
// lock is held.
func (s *shard) endGrey(key *[16]byte, first, from uint32) bool {
	if s.passed.len() > 0 {
		if p, ok := s.passed.get(key); ok {
			s.passed.remove(key)
			if p == first {
				return false
			}
		}
	}
	return first >= from
}

// deleteExpiredGrey deletes the grey triplets older than limit, counting in
// *unretried those that ended without a retry that passed (see endGrey),
// and returns how many it deleted. The shard's lock is held.
func (s *shard) deleteExpiredGrey(now, limit, from uint32, unretried *int) int {
	n := 0
	s.grey.each(func(k *[16]byte, t *uint32) bool {
		if age(now, *t) < limit {
			return false
		}
		if s.endGrey(k, *t, from) {
			*unretried++
		}
		n++
		return true
	})
	return n
}

// prunePassed drops from passed the triplets the grey map no longer holds
// as they were (after an eviction). The shard's lock is held.
func (s *shard) prunePassed() {
	if s.passed.len() == 0 {
		return
	}
	s.passed.each(func(k *[16]byte, p *uint32) bool {
		v, ok := s.grey.get(k)
		return !ok || v != *p
	})
	s.passed.shrink()
}

// age returns now-then in seconds, or 0 if the clock went backwards.
func age(now, then uint32) uint32 {
	if now < then {
		return 0
	}
	return now - then
}

// clampFuture returns t, or now when t is more than clockTolerance seconds
// after now, and reports whether it changed t.
func clampFuture(t, now uint32) (uint32, bool) {
	if t > now && t-now > clockTolerance {
		return now, true
	}
	return t, false
}

// makeRoomLocked makes room for one more entry in a shard that holds capacity
// entries at most. When the shard is full it drops expired entries, and if
// that frees too little, the oldest grey triplets, then the least recently
// seen known IPs, until 1/evictFraction of the shard is free, so that the
// cost of the scan is shared by many inserts. It returns how many entries
// were evicted (expired ones included). The caller holds s.mu for writing.
func (s *shard) makeRoomLocked(t *table, now uint32, exp expiry) int {
	capacity := t.shardCap
	if s.size() < capacity {
		return 0
	}
	defer s.prunePassed()
	target := capacity - max(capacity/evictFraction, 1)
	unretried := 0
	dropped := deleteOlderThan(&s.known, now, exp.knownLifetime)
	dropped += s.deleteExpiredGrey(now, exp.greyLifetime, t.countFrom.Load(), &unretried)
	t.unretried.Add(uint64(unretried))
	dropped += deleteExpiredLists(s.lists, now, exp)
	// Grey entries go first (a sender that retries is greylisted again,
	// at worst), then known IPs, then greylistd's white and black lists.
	steps := [...]func(want int) int{
		func(want int) int { return deleteOldest(&s.grey, want) },
		func(want int) int { return deleteOldestLists(s.lists, want, true) },
		func(want int) int { return deleteOldest(&s.known, want) },
		func(want int) int { return deleteOldestLists(s.lists, want, false) },
	}
	for _, step := range steps {
		excess := s.size() - target
		if excess <= 0 {
			break
		}
		dropped += step(excess)
	}
	return dropped
}

// size returns the number of entries the shard holds.
func (s *shard) size() int { return s.known.len() + s.grey.len() + len(s.lists) }

// deleteExpiredLists deletes greylistd's expired entries from m and returns
// how many it deleted.
func deleteExpiredLists(m map[listKey]listEntry, now uint32, exp expiry) int {
	n := 0
	for k, e := range m {
		if e.expired(now, exp) {
			delete(m, k)
			n++
		}
	}
	return n
}

// deleteOldestLists deletes the want least recently seen entries of m that
// are on the grey list (grey true) or on the white and black lists (grey
// false), and returns how many it deleted. It runs deleteOldest over a copy
// of their times and deletes what the copy lost: greylistd's entries are few
// beside the qmail ones, and an eviction is rare.
func deleteOldestLists(m map[listKey]listEntry, want int, grey bool) int {
	var times fpMap
	defer times.clear()
	for k, e := range m {
		if (e.state == listGrey) == grey {
			times.set((*[16]byte)(&k), e.last)
		}
	}
	n := deleteOldest(&times, want)
	for k, e := range m {
		if _, kept := times.get((*[16]byte)(&k)); !kept && (e.state == listGrey) == grey {
			delete(m, k)
		}
	}
	return n
}

// deleteOlderThan deletes the entries of m whose age at now is limit or more
// and returns how many it deleted.
func deleteOlderThan(m *fpMap, now, limit uint32) int {
	n := 0
	m.each(func(_ *[16]byte, t *uint32) bool {
		if age(now, *t) >= limit {
			n++
			return true
		}
		return false
	})
	return n
}

// deleteOldest deletes the want entries of m with the smallest times (or all
// of them, if m has fewer), and returns how many it deleted. It finds the
// cut-off time with 64-bucket histograms, each pass narrowing the range
// 64-fold until it is one second wide (two or three passes for times that
// span days), and allocates nothing. Entries older than the cut-off second
// all go; of those in it, which may be many (a flood), only as many as are
// still wanted.
func deleteOldest(m *fpMap, want int) int {
	if want <= 0 || m.len() == 0 {
		return 0
	}
	if want >= m.len() {
		n := m.len()
		m.clear()
		return n
	}
	lo, hi := ^uint32(0), uint32(0)
	m.each(func(_ *[16]byte, t *uint32) bool {
		lo, hi = min(lo, *t), max(hi, *t)
		return false
	})
	// Invariant: the cut-off lies in [lo, hi], and below entries are older
	// than lo.
	below := 0
	for lo < hi {
		const buckets = 64
		width := (uint64(hi-lo) + buckets) / buckets // at least 1
		var counts [buckets]int
		m.each(func(_ *[16]byte, t *uint32) bool {
			if lo <= *t && *t <= hi {
				counts[uint64(*t-lo)/width]++
			}
			return false
		})
		b := 0
		for below+counts[b] < want {
			below += counts[b]
			b++
		}
		lo, hi = lo+uint32(uint64(b)*width), lo+uint32(min(uint64(b+1)*width-1, uint64(hi-lo)))
	}
	cut, partial := lo, want-below // every entry older than cut goes, and partial of those at cut
	n := 0
	m.each(func(_ *[16]byte, t *uint32) bool {
		if *t < cut || *t == cut && partial > 0 {
			if *t == cut {
				partial--
			}
			n++
			return true
		}
		return false
	})
	return n
}

// sweepShard deletes the expired entries of shard i and shrinks its maps
// when they have emptied far below their size. It returns how many entries
// it deleted.
func (t *table) sweepShard(i int, now uint32, exp expiry) int {
	s := &t.shards[i]
	s.mu.Lock()
	clamped := clampFutureTimes(&s.known, now) + clampFutureTimes(&s.grey, now)
	unretried := 0
	n := deleteOlderThan(&s.known, now, exp.knownLifetime)
	n += s.deleteExpiredGrey(now, exp.greyLifetime, t.countFrom.Load(), &unretried)
	n += deleteExpiredLists(s.lists, now, exp)
	s.known.shrink()
	s.grey.shrink()
	s.passed.shrink()
	s.mu.Unlock()
	if unretried > 0 {
		t.unretried.Add(uint64(unretried))
	}
	if n > 0 {
		t.expired.Add(uint64(n))
	}
	if clamped > 0 {
		t.clamped.Add(uint64(clamped))
	}
	return n
}

// clampFutureTimes sets every time in m that lies more than clockTolerance
// after now to now, and returns how many it set.
func clampFutureTimes(m *fpMap, now uint32) int {
	n := 0
	m.each(func(_ *[16]byte, t *uint32) bool {
		if c, changed := clampFuture(*t, now); changed {
			*t = c
			n++
		}
		return false
	})
	return n
}

// counts returns the number of known IPs and grey triplets held.
func (t *table) counts() (known, grey int) {
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.RLock()
		known += s.known.len()
		grey += s.grey.len()
		s.mu.RUnlock()
	}
	return known, grey
}

// listCount returns the number of greylistd entries held.
func (t *table) listCount() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.RLock()
		n += len(s.lists)
		s.mu.RUnlock()
	}
	return n
}

// recordSize is the size of an entry record: 16-byte key, 4-byte time.
const recordSize = 20

// appendRecord appends the record of one entry to dst.
func appendRecord(dst []byte, k [16]byte, t uint32) []byte {
	dst = append(dst, k[:]...)
	return binary.BigEndian.AppendUint32(dst, t)
}

// parseRecord returns the key and time of the record at the start of b.
func parseRecord(b []byte) ([16]byte, uint32) {
	return [16]byte(b[:16]), binary.BigEndian.Uint32(b[16:recordSize])
}

// appendShardRecords appends the known IPs and the grey triplets of shard i
// to known and grey as records, and returns the extended slices. It holds
// the shard's read lock while it copies; the caller reuses the slices so
// that this does not allocate once they have grown.
func (t *table) appendShardRecords(i int, known, grey []byte) ([]byte, []byte) {
	s := &t.shards[i]
	s.mu.RLock()
	s.known.each(func(k *[16]byte, v *uint32) bool {
		known = appendRecord(known, *k, *v)
		return false
	})
	s.grey.each(func(k *[16]byte, v *uint32) bool {
		grey = appendRecord(grey, *k, *v)
		return false
	})
	s.mu.RUnlock()
	return known, grey
}

// appendShardLists appends shard i's greylistd entries to dst as list
// records and returns the extended slice, as appendShardRecords does.
func (t *table) appendShardLists(i int, dst []byte) []byte {
	s := &t.shards[i]
	s.mu.RLock()
	for k, e := range s.lists {
		dst = appendListRecord(dst, k, e)
	}
	s.mu.RUnlock()
	return dst
}

// listRecordSize is the size of a greylistd entry's record: 16-byte key,
// first seen, last seen, count (4 bytes each), list (1 byte).
const listRecordSize = 29

// appendListRecord appends the record of one greylistd entry to dst.
func appendListRecord(dst []byte, k listKey, e listEntry) []byte {
	dst = append(dst, k[:]...)
	dst = binary.BigEndian.AppendUint32(dst, e.first)
	dst = binary.BigEndian.AppendUint32(dst, e.last)
	dst = binary.BigEndian.AppendUint32(dst, e.count)
	return append(dst, byte(e.state))
}

// parseListRecord returns the key and entry of the list record at the start
// of b, and false when its list is not one of greylistd's three.
func parseListRecord(b []byte) (listKey, listEntry, bool) {
	e := listEntry{
		first: binary.BigEndian.Uint32(b[16:]),
		last:  binary.BigEndian.Uint32(b[20:]),
		count: binary.BigEndian.Uint32(b[24:]),
		state: listState(b[28]),
	}
	return listKey(b[:16]), e, e.state >= listWhite && e.state <= listBlack
}

// changeList runs change on the greylistd entry of k (found false when there
// is none, or it has expired) under the shard's lock, stores what change
// returns (or deletes the entry when keep is false), and returns the entry
// as it was. change must be quick: the shard waits for it.
func (t *table) changeList(k listKey, now uint32, exp expiry, change func(old listEntry, found bool) (next listEntry, keep bool)) (listEntry, bool) {
	s := t.shardFor(k.shardHash())
	var evicted int
	s.mu.Lock()
	old, found := s.lists[k]
	if found && old.expired(now, exp) {
		delete(s.lists, k)
		old, found = listEntry{}, false
	}
	next, keep := change(old, found)
	switch {
	case keep && !found:
		evicted = s.makeRoomLocked(t, now, exp)
		if s.lists == nil {
			s.lists = make(map[listKey]listEntry)
		}
		s.lists[k] = next
	case keep:
		s.lists[k] = next
	case found:
		delete(s.lists, k)
	}
	s.mu.Unlock()
	if evicted > 0 {
		t.evicted.Add(uint64(evicted))
	}
	return old, found
}

// lookupList returns the greylistd entry of k, unless there is none or it
// has expired.
func (t *table) lookupList(k listKey, now uint32, exp expiry) (listEntry, bool) {
	s := t.shardFor(k.shardHash())
	s.mu.RLock()
	e, ok := s.lists[k]
	s.mu.RUnlock()
	if !ok || e.expired(now, exp) {
		return listEntry{}, false
	}
	return e, true
}

// listTotals counts greylistd's live entries and the requests they matched,
// by list (indexed by listState).
type listTotals struct {
	entries, hits [listBlack + 1]uint64
}

// countLists returns the totals of greylistd's live entries at now.
func (t *table) countLists(now uint32, exp expiry) listTotals {
	var tot listTotals
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.RLock()
		for _, e := range s.lists {
			if !e.expired(now, exp) {
				tot.entries[e.state]++
				tot.hits[e.state] += uint64(e.count)
			}
		}
		s.mu.RUnlock()
	}
	return tot
}

// clearLists deletes every greylistd entry on list state and returns how
// many it deleted.
func (t *table) clearLists(state listState) int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for k, e := range s.lists {
			if e.state == state {
				delete(s.lists, k)
				n++
			}
		}
		s.mu.Unlock()
	}
	return n
}

// clamp returns clampFuture(v, now) and counts a change.
func (t *table) clamp(v, now uint32) uint32 {
	c, changed := clampFuture(v, now)
	if changed {
		t.clamped.Add(1)
	}
	return c
}

// restoreKnown inserts a known IP loaded from a snapshot, keeping the later
// time if the IP is already held. It respects the cap like any insert.
func (t *table) restoreKnown(client clientKey, lastSeen, now uint32, exp expiry) {
	lastSeen = t.clamp(lastSeen, now)
	s := t.shardFor(client.shardHash())
	s.mu.Lock()
	var evicted int
	k := (*[16]byte)(&client)
	if old, ok := s.known.get(k); ok {
		s.known.set(k, max(old, lastSeen))
	} else {
		evicted = s.makeRoomLocked(t, now, exp)
		s.known.insert(k, lastSeen)
	}
	s.mu.Unlock()
	if evicted > 0 {
		t.evicted.Add(uint64(evicted))
	}
}

// reserveGrey makes room for grey triplets entries in all (at most the
// cap), spread over the shards as keys spread: a load sizes the maps once.
func (t *table) reserveGrey(entries int) {
	per := min(entries, t.capacity()) / len(t.shards)
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		s.grey.reserve(per)
		s.mu.Unlock()
	}
}

// restoreList inserts a greylistd entry loaded from a snapshot, unless the
// data string is already held, and reports whether it inserted it.
func (t *table) restoreList(k listKey, e listEntry, now uint32, exp expiry) bool {
	e.first, e.last = t.clamp(e.first, now), t.clamp(e.last, now)
	s := t.shardFor(k.shardHash())
	s.mu.Lock()
	var evicted int
	_, held := s.lists[k]
	if !held {
		evicted = s.makeRoomLocked(t, now, exp)
		if s.lists == nil {
			s.lists = make(map[listKey]listEntry)
		}
		s.lists[k] = e
	}
	s.mu.Unlock()
	if evicted > 0 {
		t.evicted.Add(uint64(evicted))
	}
	return !held
}

// restoreGrey inserts a grey triplet loaded from a snapshot, keeping the
// earlier time if the triplet is already held.
func (t *table) restoreGrey(k tripletKey, firstSeen, now uint32, exp expiry) {
	firstSeen = t.clamp(firstSeen, now)
	s := t.shardFor(k.shardHash())
	s.mu.Lock()
	var evicted int
	key := (*[16]byte)(&k)
	if old, ok := s.grey.get(key); ok {
		s.grey.set(key, min(old, firstSeen))
	} else {
		evicted = s.makeRoomLocked(t, now, exp)
		s.grey.insert(key, firstSeen)
	}
	s.mu.Unlock()
	if evicted > 0 {
		t.evicted.Add(uint64(evicted))
	}
}
