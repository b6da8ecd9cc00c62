package main

import (
	"math/rand/v2"
	"os"
	"testing"
)

// TestFPMapModel runs random operations on an fpMap and on a Go map side
// by side, from a key space small enough that keys come and go many times
// (tombstones, growths, shrinks, operations in the middle of a growth), and
// compares them every so often.
func TestFPMapModel(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	var m fpMap
	defer m.clear()
	model := map[[16]byte]uint32{}
	check := func(step int) {
		t.Helper()
		if m.len() != len(model) {
			t.Fatalf("step %d: %d entries, model %d", step, m.len(), len(model))
		}
		seen := 0
		m.each(func(k *[16]byte, v *uint32) bool {
			if want, ok := model[*k]; !ok || want != *v {
				t.Fatalf("step %d: entry %x=%d, model %d (held %v)", step, *k, *v, want, ok)
			}
			seen++
			return false
		})
		if seen != len(model) {
			t.Fatalf("step %d: each visited %d of %d", step, seen, len(model))
		}
		if m.cur.full+m.cur.deleted > m.cur.slots()*maxLoadNum/maxLoadDen {
			t.Fatalf("step %d: %d full and %d deleted of %d slots", step, m.cur.full, m.cur.deleted, m.cur.slots())
		}
		if m.count != m.cur.full+m.old.full {
			t.Fatalf("step %d: %d entries counted, %d + %d held", step, m.count, m.cur.full, m.old.full)
		}
	}
	migrating := 0
	for step := range 200_000 {
		k := tkey(uint64(r.IntN(50_000)))
		key := (*[16]byte)(&k)
		switch op := r.IntN(10_000); {
		case op < 6000:
			v := r.Uint32()
			if _, held := model[k]; m.set(key, v) == held {
				t.Fatalf("step %d: set reported new=%v for a key the model held=%v", step, !held, held)
			}
			model[k] = v
		case op < 9950:
			v, ok := m.get(key)
			if want, held := model[k]; ok != held || v != want {
				t.Fatalf("step %d: get %d,%v; model %d,%v", step, v, ok, want, held)
			}
		case op < 9995:
			// Delete a random part of the entries, as a sweep does.
			part := 1 + r.IntN(10)
			m.each(func(k *[16]byte, _ *uint32) bool {
				if r.IntN(part) == 0 {
					delete(model, *k)
					return true
				}
				return false
			})
			m.shrink()
		default:
			m.clear()
			clear(model)
		}
		if len(m.old.groups) > 0 {
			migrating++
			if step%50 == 0 {
				check(step) // in the middle of a growth
			}
		}
		if step%1000 == 0 {
			check(step)
		}
	}
	check(-1)
	if migrating < 100 {
		t.Fatalf("only %d steps ran while the map was growing; the test does not exercise incremental growth", migrating)
	}
	t.Logf("%d of 200,000 steps ran while the map was growing", migrating)
}

// TestFPMapMemory checks the promise of fptable.go: with 100,000 entries the
// map holds 21-byte slots at 70% to 87.5% load, whether it grew entry by
// entry or was reserved for them.
func TestFPMapMemory(t *testing.T) {
	const n = 100_000
	for _, reserved := range []bool{false, true} {
		var m fpMap
		if reserved {
			m.reserve(n)
		}
		for i := range uint64(n) {
			k := tkey(i)
			m.set((*[16]byte)(&k), uint32(i))
		}
		perEntry := float64(m.bytes()) / n
		if perEntry < 21/0.875 || perEntry > 21/0.69+float64(os.Getpagesize())/n {
			t.Errorf("reserved %v: %.1f bytes an entry (%d in %d slots)", reserved, perEntry, m.len(), m.slots())
		}
		t.Logf("reserved %v: %.1f bytes an entry", reserved, perEntry)
		m.clear()
	}
}

// TestFPMapEveryKeyAfterEveryChange inserts 3,000 keys one by one, deleting
// every third one again, and after every change looks every live key up
// (and a deleted one), across the map's incremental growths: a slot lost
// in a migration shows at the first lookup after it. It also counts the
// control bytes of both tables after every change: the full and deleted
// counts must match them, and the load limit is 7/8.
func TestFPMapEveryKeyAfterEveryChange(t *testing.T) {
	if maxLoadNum != 7 || maxLoadDen != 8 {
		t.Fatalf("load limit %d/%d, want 7/8 (87.5%%, as documented)", maxLoadNum, maxLoadDen)
	}
	var m fpMap
	defer m.clear()
	live := map[uint64]uint32{}
	var gone []uint64
	growths := 0
	check := func(step int) {
		t.Helper()
		for n, want := range live {
			k := tkey(n)
			if v, ok := m.get((*[16]byte)(&k)); !ok || v != want {
				t.Fatalf("step %d: key %d: %d,%v; want %d", step, n, v, ok, want)
			}
		}
		for _, n := range gone[max(0, len(gone)-3):] {
			k := tkey(n)
			if _, ok := m.get((*[16]byte)(&k)); ok {
				t.Fatalf("step %d: deleted key %d still found", step, n)
			}
		}
		// (The old table marks the slots it has moved deleted without
		// counting them: only lookups read it.)
		for i, tb := range []*groupTable{&m.cur, &m.old} {
			full, deleted := 0, 0
			for g := range tb.groups {
				for _, c := range tb.groups[g].ctrl {
					switch {
					case c == ctrlDeleted:
						deleted++
					case c != ctrlEmpty:
						full++
					}
				}
			}
			if i == 1 {
				deleted = tb.deleted
			}
			if full != tb.full || deleted != tb.deleted {
				t.Fatalf("step %d: control bytes say %d full, %d deleted; counted %d, %d", step, full, deleted, tb.full, tb.deleted)
			}
		}
	}
	for n := range uint64(3000) {
		k := tkey(n)
		wasGrowing := len(m.old.groups) > 0
		m.set((*[16]byte)(&k), uint32(n))
		live[n] = uint32(n)
		if !wasGrowing && len(m.old.groups) > 0 {
			growths++
		}
		check(int(n))
		if n%3 == 2 {
			d := n - 1
			m.each(func(k *[16]byte, _ *uint32) bool { return *k == tkey(d) })
			delete(live, d)
			gone = append(gone, d)
			check(int(n))
		}
	}
	if growths < 3 {
		t.Fatalf("%d growths; the test must cross several", growths)
	}
}
