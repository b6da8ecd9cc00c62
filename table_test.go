package main

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
)

var testExpiry = testPolicy.expiry()

func tkey(i uint64) tripletKey {
	var k tripletKey
	binary.BigEndian.PutUint64(k[:8], mix64(i))
	binary.BigEndian.PutUint64(k[8:], mix64(i+1<<40))
	return k
}

func ckey(i uint32) clientKey {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], i)
	return makeTestClientKey(b)
}

func makeTestClientKey(b [4]byte) clientKey {
	k, _, _ := makeClientKey([]byte(fmt.Sprintf("%d.%d.%d.%d", b[0], b[1], b[2], b[3])))
	return k
}

// TestTableCapEvictsGreyBeforeKnown fills a table past its cap and checks
// that it never holds more than the cap, that old grey triplets go first,
// and that known IPs survive while grey triplets remain.
func TestTableCapEvictsGreyBeforeKnown(t *testing.T) {
	tb := newTable(4, 4000)
	if tb.capacity() != 4000 {
		t.Fatalf("capacity %d, want 4000", tb.capacity())
	}
	now := uint32(1_000_000)
	for i := range uint32(500) {
		tb.markKnown(ckey(i), now, testExpiry)
	}
	for i := range uint64(20_000) {
		tb.observeTriplet(tkey(i), now+uint32(i/100), 300, 43200, testExpiry)
		if known, grey := tb.counts(); known+grey > tb.capacity() {
			t.Fatalf("after %d inserts the table holds %d entries, cap %d", i+1, known+grey, tb.capacity())
		}
	}
	known, grey := tb.counts()
	if known != 500 {
		t.Fatalf("known IPs evicted while grey triplets remained: %d of 500 left", known)
	}
	if grey < 3000 {
		t.Fatalf("only %d grey triplets held; eviction freed far more than needed", grey)
	}
	if tb.evicted.Load() == 0 {
		t.Fatal("evictions were not counted")
	}
	// The newest triplet is held, the oldest is gone.
	if st, _ := tb.observeTriplet(tkey(19_999), now+200, 300, 43200, testExpiry); st != greyTooSoon {
		t.Errorf("newest triplet: state %d, want held (too soon)", st)
	}
	if st, _ := tb.observeTriplet(tkey(0), now+200, 300, 43200, testExpiry); st != greyNew {
		t.Errorf("oldest triplet: state %d, want evicted (new)", st)
	}
}

// TestTableCapEvictsKnownWhenNoGrey checks that known IPs are evicted, least
// recently seen first, once no grey triplets are left.
func TestTableCapEvictsKnownWhenNoGrey(t *testing.T) {
	tb := newTable(1, 1000)
	now := uint32(1_000_000)
	for i := range uint32(5000) {
		tb.markKnown(ckey(i), now+i, testExpiry)
	}
	known, _ := tb.counts()
	if known > 1000 || known < 800 {
		t.Fatalf("holds %d known IPs, want between 800 and the cap 1000", known)
	}
	if !tb.refreshKnown(ckey(4999), now+5000, testExpiry.knownLifetime) {
		t.Error("the most recent known IP was evicted")
	}
	if tb.refreshKnown(ckey(0), now+5000, testExpiry.knownLifetime) {
		t.Error("the least recent known IP survived")
	}
}

// TestSweepShrinksMaps checks that a sweep deletes what expired and gives
// memory back by shrinking a map that emptied.
func TestSweepShrinksMaps(t *testing.T) {
	tb := newTable(1, 1_000_000)
	now := uint32(1_000_000)
	for i := range uint64(10_000) {
		tb.observeTriplet(tkey(i), now, 300, 43200, testExpiry)
	}
	for i := range uint64(100) {
		tb.observeTriplet(tkey(1_000_000+i), now+43000, 300, 43200, testExpiry)
	}
	s := &tb.shards[0]
	before := s.grey.bytes()
	n := tb.sweepShard(0, now+43200+60, testExpiry)
	if n != 10_000 {
		t.Fatalf("swept %d, want 10000", n)
	}
	if before < 10_000*24 {
		t.Fatalf("10,100 entries in %d bytes", before)
	}
	if s.grey.len() != 100 || s.grey.bytes() > 4*os.Getpagesize() {
		t.Fatalf("after sweep: %d entries in %d bytes (%d before); want 100 in a shrunk map", s.grey.len(), s.grey.bytes(), before)
	}
	if tb.expired.Load() != 10_000 {
		t.Fatalf("expired counter %d", tb.expired.Load())
	}
}

// TestDeleteOldest checks the histogram eviction against sorting: exactly
// the number wanted goes, and none newer than one kept. The trials go from
// a flood (every entry in one second) to times spread over all 32 bits.
func TestDeleteOldest(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := range 300 {
		var m fpMap
		before := map[tripletKey]uint32{}
		n := 1 + r.IntN(500)
		for i := range n {
			v := r.Uint32()
			if trial < 200 {
				v = 1000 + uint32(r.IntN(1+trial*50))
			}
			k := tkey(uint64(i))
			m.set((*[16]byte)(&k), v)
			before[k] = v
		}
		want := r.IntN(n + 1)
		got := deleteOldest(&m, want)
		if got != want || got != len(before)-m.len() {
			t.Fatalf("trial %d: deleted %d (map shrank by %d), want %d", trial, got, len(before)-m.len(), want)
		}
		// Every survivor is at least as new as every deleted entry.
		oldestKept := ^uint32(0)
		m.each(func(_ *[16]byte, v *uint32) bool {
			oldestKept = min(oldestKept, *v)
			return false
		})
		for k, v := range before {
			if _, kept := m.get((*[16]byte)(&k)); !kept && v > oldestKept {
				t.Fatalf("trial %d: deleted time %d but kept %d", trial, v, oldestKept)
			}
		}
		m.clear()
	}
}

// FuzzTableModel runs a stream of operations against the table and a plain
// map model with the same rules, and compares every answer.
func FuzzTableModel(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 250, 3, 2, 1})
	f.Add([]byte{1, 1, 1, 1, 200, 1, 1, 255, 255, 1})
	f.Fuzz(func(t *testing.T, ops []byte) {
		tb := newTable(4, 1_000_000) // no eviction: the model has no cap
		modelGrey := map[tripletKey]uint32{}
		modelKnown := map[clientKey]uint32{}
		now := uint32(1_000_000)
		const minDelay, window, lifetime = 300, 43200, 604800
		for len(ops) >= 2 {
			op, arg := ops[0], ops[1]
			ops = ops[2:]
			switch op % 4 {
			case 0: // time passes
				now += uint32(arg) * 97
			case 1: // a triplet is seen
				k := tkey(uint64(arg % 16))
				got, gotFirst := tb.observeTriplet(k, now, minDelay, window, testExpiry)
				want := greyNew
				if first, ok := modelGrey[k]; !ok {
					modelGrey[k] = now
				} else if a := now - first; a < minDelay {
					want = greyTooSoon
				} else if a < window {
					want = greyRetryOK
				} else {
					want, modelGrey[k] = greyStale, now
				}
				if got != want || gotFirst != modelGrey[k] {
					t.Fatalf("triplet %d at %d: got %d first seen %d, want %d first seen %d", arg%16, now, got, gotFirst, want, modelGrey[k])
				}
			case 2: // a client becomes known
				k := ckey(uint32(arg % 8))
				tb.markKnown(k, now, testExpiry)
				modelKnown[k] = now
			case 3: // a client is looked up
				k := ckey(uint32(arg % 8))
				got := tb.refreshKnown(k, now, lifetime)
				last, ok := modelKnown[k]
				want := ok && now-last < lifetime
				if want {
					modelKnown[k] = now
				}
				if got != want {
					t.Fatalf("client %d at %d: got %v, want %v", arg%8, now, got, want)
				}
			}
			if arg == 255 { // a sweep
				for i := range tb.shards {
					tb.sweepShard(i, now, testExpiry)
				}
				for k, v := range modelGrey {
					if now-v >= testExpiry.greyLifetime {
						delete(modelGrey, k)
					}
				}
				for k, v := range modelKnown {
					if now-v >= testExpiry.knownLifetime {
						delete(modelKnown, k)
					}
				}
			}
		}
		known, grey := tb.counts()
		if known != len(modelKnown) || grey != len(modelGrey) {
			t.Fatalf("table holds %d known, %d grey; model %d, %d", known, grey, len(modelKnown), len(modelGrey))
		}
	})
}

// TestTableConcurrent hammers one table from several goroutines with
// overlapping keys, sweeps and snapshots (for -race).
func TestTableConcurrent(t *testing.T) {
	tb := newTable(8, 5000)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range uint64(5000) {
				now := uint32(1_000_000 + i)
				tb.observeTriplet(tkey(i%3000), now, 300, 43200, testExpiry)
				tb.markKnown(ckey(uint32(i%700)+uint32(w)), now, testExpiry)
				tb.refreshKnown(ckey(uint32(i%500)), now, 604800)
			}
		})
	}
	wg.Go(func() {
		var k, g []byte
		for range 20 {
			for i := range tb.shards {
				tb.sweepShard(i, 1_002_000, testExpiry)
				k, g = tb.appendShardRecords(i, k[:0], g[:0])
			}
		}
	})
	wg.Wait()
	if known, grey := tb.counts(); known+grey > tb.capacity() {
		t.Fatalf("%d entries over the cap %d", known+grey, tb.capacity())
	}
}

func TestShardsFor(t *testing.T) {
	for maxEntries, want := range map[int]int{1000: 8, 10_000: 128, 16_384: 256, 2_000_000: 256, 2_100_000: 512, 20_000_000: 4096} {
		if got := shardsFor(maxEntries); got != want {
			t.Errorf("shardsFor(%d) = %d, want %d", maxEntries, got, want)
		}
	}
}

// TestCapAfterFlood floods tables of several sizes with unique triplets in
// one second, as a spam run does, and checks that the table then holds what
// the README says: at most max_entries, and at least 1-1/evictFraction of
// its capacity (max_entries rounded down to whole shards, by under 2%),
// that every eviction is counted, and that known IPs survive.
func TestCapAfterFlood(t *testing.T) {
	for _, maxEntries := range []int{1000, 10_000, 100_000} {
		tb := newTable(shardsFor(maxEntries), maxEntries)
		if c := tb.capacity(); c > maxEntries || float64(c) < 0.98*float64(maxEntries) {
			t.Errorf("max_entries %d: capacity %d", maxEntries, c)
		}
		const now = 1_000_000
		for i := range uint32(50) {
			tb.markKnown(ckey(i), now, testExpiry)
		}
		inserted := 50
		for i := range uint64(5 * maxEntries) {
			if st, _ := tb.observeTriplet(tkey(i), now, 300, 43200, testExpiry); st == greyNew {
				inserted++
			}
		}
		known, grey := tb.counts()
		held := known + grey
		lo, hi := float64(tb.capacity())*(1-1.0/evictFraction), float64(tb.capacity())
		if float64(held) < lo || float64(held) > hi {
			t.Errorf("max_entries %d: holds %d after the flood, want %.0f to %.0f", maxEntries, held, lo, hi)
		}
		if known != 50 {
			t.Errorf("max_entries %d: %d of 50 known IPs kept", maxEntries, known)
		}
		if ev := tb.evicted.Load(); ev != uint64(inserted-held) {
			t.Errorf("max_entries %d: %d evictions counted, %d entries gone", maxEntries, ev, inserted-held)
		}
		t.Logf("max_entries %d: holds %d (%.1f%%)", maxEntries, held, 100*float64(held)/float64(maxEntries))
	}
}

// TestFutureTimesClamped checks that an entry stamped far in the future (a
// save file from a host whose clock ran ahead, a clock that stepped back)
// is set to now by a load or a sweep, and then ages and expires as usual.
func TestFutureTimesClamped(t *testing.T) {
	tb := newTable(16, 10_000)
	const now = 1_000_000
	const future = now + 10*365*24*3600
	tb.restoreKnown(ckey(1), future, now, testExpiry)
	tb.restoreGrey(tkey(1), future, now, testExpiry)
	tb.restoreGrey(tkey(2), now+30, now, testExpiry) // within the tolerance: kept as it is
	if got := tb.clamped.Load(); got != 2 {
		t.Fatalf("clamped %d at load, want 2", got)
	}
	known, grey := tableContents(tb)
	if known[ckey(1)] != now || grey[tkey(1)] != now || grey[tkey(2)] != now+30 {
		t.Fatalf("after load: %v %v", known, grey)
	}
	// An entry that is already held when the clock steps back.
	tb.markKnown(ckey(2), future, testExpiry)
	for i := range tb.shards {
		tb.sweepShard(i, now, testExpiry)
	}
	if got := tb.clamped.Load(); got != 3 {
		t.Fatalf("clamped %d after the sweep, want 3", got)
	}
	later := uint32(now + testExpiry.knownLifetime)
	for i := range tb.shards {
		tb.sweepShard(i, later, testExpiry)
	}
	if known, grey := tb.counts(); known != 0 || grey != 0 {
		t.Fatalf("%d known IPs and %d grey triplets left a lifetime later; want them expired", known, grey)
	}
}

// TestGreyUnretriedCounted checks the count of grey triplets whose time
// ended without a retry that passed: a triplet never retried and one only
// retried too soon count when a sweep drops them, one that passed does
// not; a stale triplet seen again after its window counts (unless it had
// passed); triplets first seen before countFrom (loaded from a state file)
// never count; and the passed marks go with their triplets.
func TestGreyUnretriedCounted(t *testing.T) {
	const delay, window = 300, 43200
	now := uint32(1_700_000_000)
	tb := newTable(4, 100_000)
	tb.observeTriplet(tkey(99), now-10, delay, window, testExpiry) // before countFrom: loaded
	tb.countFrom.Store(now)
	for _, k := range []uint64{1, 2, 3, 4, 5} {
		tb.observeTriplet(tkey(k), now, delay, window, testExpiry)
	}
	tb.observeTriplet(tkey(2), now+60, delay, window, testExpiry) // too soon
	if st, _ := tb.observeTriplet(tkey(3), now+400, delay, window, testExpiry); st != greyRetryOK {
		t.Fatalf("retry of 3: %v", st)
	}
	tb.observeTriplet(tkey(3), now+500, delay, window, testExpiry) // passes again: one mark
	if st, _ := tb.observeTriplet(tkey(5), now+600, delay, window, testExpiry); st != greyRetryOK {
		t.Fatalf("retry of 5: %v", st)
	}
	// 4 is seen again after its window: stale, restarted; it had no retry.
	// 5 too, but it had passed.
	for _, k := range []uint64{4, 5} {
		if st, _ := tb.observeTriplet(tkey(k), now+window+10, delay, window, testExpiry); st != greyStale {
			t.Fatalf("%d after the window: %v", k, st)
		}
	}
	if got := tb.unretried.Load(); got != 1 {
		t.Fatalf("after the stale restarts: %d unretried, want 1 (4)", got)
	}
	// A sweep after every lifetime: 1 and 2 count, 3 (passed) and 99
	// (loaded) do not; 4 and 5 restarted and are young again.
	later := now + testExpiry.greyLifetime + 1
	for i := range tb.shards {
		tb.sweepShard(i, later, testExpiry)
	}
	if got := tb.unretried.Load(); got != 3 {
		t.Errorf("after the sweep: %d unretried, want 3 (4, then 1 and 2)", got)
	}
	marks := 0
	for i := range tb.shards {
		marks += tb.shards[i].passed.len()
	}
	if marks != 0 {
		t.Errorf("%d passed marks left after their triplets went", marks)
	}
}
