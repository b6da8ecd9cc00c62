package main

import (
	"encoding/binary"
	"math/bits"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// An fpMap maps 16-byte keys to uint32 values: the known-IP and grey-triplet
// maps of one table shard (table.go). It is an open-addressing hash table in
// the shape of a Swiss table: slots in groups of eight, each group with a
// control byte per slot (empty, deleted, or full with 7 bits of the key's
// hash), probed a group at a time and matched eight control bytes at once.
// A slot is 21 bytes (16 key, 4 value, 1 control) and the map keeps between
// 70% and 87.5% of its slots full, so an entry costs 24 to 30 bytes.
//
// The groups live outside the Go heap, in anonymous memory mapped for them
// and unmapped when the map is resized: the garbage collector neither scans
// them nor keeps a heap's headroom above them, and a resize gives the old
// memory back to the kernel at once. (Where mmap fails, they fall back to
// the Go heap.)
//
// A map grows incrementally: growing maps the new groups and leaves the
// entries in the old ones, and every later insert moves a few old groups
// (migrateStep) until none is left, so that no single operation moves the
// whole map. Meanwhile lookups try the new groups, then the old.
//
// An fpMap is not safe for concurrent use; its shard's lock guards it.
type fpMap struct {
	cur   groupTable // where inserts go
	old   groupTable // the groups being moved to cur; empty when none
	moved int        // old groups moved so far
	count int        // entries, in both
}

// A groupTable is one array of groups and what it holds.
type groupTable struct {
	groups  []slotGroup
	mem     []byte // the mapping the groups live in; nil for none or heap memory
	full    int    // full slots
	deleted int    // deleted slots (tombstones)
}

// A slotGroup is eight slots: 168 bytes without pointers.
type slotGroup struct {
	ctrl [groupSlots]uint8
	keys [groupSlots][16]byte
	vals [groupSlots]uint32
}

const (
	groupSlots = 8
	groupSize  = int(unsafe.Sizeof(slotGroup{}))

	// Control bytes. Mapped memory starts zeroed: all empty.
	ctrlEmpty   = 0x00
	ctrlDeleted = 0x01
	ctrlFull    = 0x80 // | 7 bits of the hash

	// The map grows (or drops its tombstones) when full and deleted slots
	// pass 7/8 of all, and is then resized to hold its entries at 70%.
	maxLoadNum, maxLoadDen = 7, 8
	resizeLoad             = 0.7
	// A load sizes the maps for what it expects at 80%: the per-shard
	// counts vary by a few percent, far less than the room up to 87.5%.
	reserveLoad = 0.8
	// It shrinks when a sweep leaves it less than a quarter full.
	shrinkBelow = 0.25

	// migrateStep is how many old groups each insert moves while the map
	// grows: 512 slots, tens of microseconds. The new groups fill up only
	// after about a quarter more entries, long after the old ones have
	// moved. (8 groups a step made lookups slower: more of them found the
	// map in the middle of a growth, where a miss probes both tables.)
	migrateStep = 64

	lsb = 0x0101010101010101
	msb = 0x8080808080808080
)

// zeroBytes returns a word with the high bit set in each byte of x that is
// zero (and possibly in bytes above one that is: callers check the key).
func zeroBytes(x uint64) uint64 { return (x - lsb) &^ x & msb }

// len returns the number of entries.
func (m *fpMap) len() int { return m.count }

// slots returns the number of slots inserts go to.
func (m *fpMap) slots() int { return m.cur.slots() }

// bytes returns the memory the map holds.
func (m *fpMap) bytes() int { return (len(m.cur.groups) + len(m.old.groups)) * groupSize }

// get returns the value of k.
func (m *fpMap) get(k *[16]byte) (uint32, bool) {
	t, g, i, ok := m.find(k)
	if !ok {
		return 0, false
	}
	return t.groups[g].vals[i], true
}

// find returns the table, group and slot that hold k, or ok false.
func (m *fpMap) find(k *[16]byte) (t *groupTable, g, i int, ok bool) {
	h := fpHash(k)
	if g, i, ok = m.cur.find(k, h); ok {
		return &m.cur, g, i, true
	}
	if len(m.old.groups) > 0 {
		if g, i, ok = m.old.find(k, h); ok {
			return &m.old, g, i, true
		}
	}
	return nil, 0, 0, false
}

// set sets the value of k, inserting it if it is new, and reports whether
// it was new.
func (m *fpMap) set(k *[16]byte, v uint32) bool {
	if t, g, i, ok := m.find(k); ok {
		t.groups[g].vals[i] = v
		return false
	}
	m.insert(k, v)
	return true
}

// insert adds k, which the map does not hold, with value v: it moves a step
// of a growth in progress, or starts one when the map is full.
func (m *fpMap) insert(k *[16]byte, v uint32) {
	if len(m.old.groups) > 0 {
		m.migrate(migrateStep)
	}
	if (m.cur.full+m.cur.deleted+1)*maxLoadDen > m.cur.slots()*maxLoadNum {
		m.grow()
	}
	m.cur.insertNew(k, fpHash(k), v)
	m.count++
}

// grow starts moving the map to groups with room for its entries at
// resizeLoad; the entries move a step at a time (migrate). A growth still
// in progress is finished first.
func (m *fpMap) grow() {
	m.migrate(len(m.old.groups))
	m.old = m.cur
	m.moved = 0
	m.cur = newGroupTable(int(float64(m.count+1)/resizeLoad/groupSlots) + 1)
	if m.old.full == 0 {
		m.old.release()
		m.old = groupTable{}
	}
}

// migrate moves up to n old groups' entries to the current groups, and
// frees the old groups once all have moved. A moved slot is marked deleted,
// not empty, so that probes for keys further on still pass it.
func (m *fpMap) migrate(n int) {
	for ; n > 0 && m.moved < len(m.old.groups); n-- {
		grp := &m.old.groups[m.moved]
		for full := binary.LittleEndian.Uint64(grp.ctrl[:]) & msb; full != 0; full &= full - 1 {
			i := bits.TrailingZeros64(full) / 8
			m.cur.insertNew(&grp.keys[i], fpHash(&grp.keys[i]), grp.vals[i])
			grp.ctrl[i] = ctrlDeleted
			m.old.full--
		}
		m.moved++
	}
	if len(m.old.groups) > 0 && (m.moved == len(m.old.groups) || m.old.full == 0) {
		m.old.release()
		m.old, m.moved = groupTable{}, 0
	}
}

// reserve makes room for want entries in all, filling the slots to
// reserveLoad, unless the map has that room already: a load that knows how
// many entries are coming sizes the map once.
func (m *fpMap) reserve(want int) {
	if groups := int(float64(want)/reserveLoad/groupSlots) + 1; groups > len(m.cur.groups) {
		m.resizeTo(groups)
	}
}

// shrink resizes a map that holds far fewer entries than it has room for,
// so that a sweep gives memory back.
func (m *fpMap) shrink() {
	if m.cur.slots() > 4*groupSlots*pageGroups() && float64(m.count) < shrinkBelow*float64(m.cur.slots()) {
		m.resizeTo(int(float64(m.count)/resizeLoad/groupSlots) + 1)
	}
}

// resizeTo moves every entry at once to groups new groups (or more: whole
// pages), and frees the old ones. A shrink or a reserve does this: the
// first happens to a map mostly empty, the second before a load.
func (m *fpMap) resizeTo(groups int) {
	m.migrate(len(m.old.groups))
	old := m.cur
	m.cur = newGroupTable(groups)
	old.each(func(k *[16]byte, v *uint32) bool {
		m.cur.insertNew(k, fpHash(k), *v)
		return false
	})
	old.release()
}

// remove deletes k and reports whether the map held it.
func (m *fpMap) remove(k *[16]byte) bool {
	t, g, i, ok := m.find(k)
	if !ok {
		return false
	}
	t.deleteAt(g, i)
	m.count--
	return true
}

// each calls f for every entry, with a pointer to its value (which f may
// change); when f returns true, the entry is deleted.
func (m *fpMap) each(f func(k *[16]byte, v *uint32) (remove bool)) {
	n := m.cur.each(f)
	if len(m.old.groups) > 0 {
		n += m.old.each(f)
	}
	m.count -= n
}

// clear removes every entry and gives the memory back.
func (m *fpMap) clear() {
	m.free()
	*m = fpMap{}
}

// free gives the map's memory back.
func (m *fpMap) free() {
	m.cur.release()
	m.old.release()
}

// newGroupTable returns a table of n or more empty groups.
func newGroupTable(n int) groupTable {
	groups, mem := allocGroups(n)
	return groupTable{groups: groups, mem: mem}
}

// slots returns the number of slots.
func (t *groupTable) slots() int { return len(t.groups) * groupSlots }

// home returns the group where the probe for hash h starts, and h's control
// byte.
func (t *groupTable) home(h uint64) (int, uint8) {
	g, _ := bits.Mul64(h, uint64(len(t.groups)))
	return int(g), ctrlFull | uint8(h&0x7f)
}

// find returns the group and slot of k, whose hash is h, or ok false.
func (t *groupTable) find(k *[16]byte, h uint64) (g, i int, ok bool) {
	n := len(t.groups)
	if n == 0 {
		return 0, 0, false
	}
	g, c := t.home(h)
	pattern := lsb * uint64(c)
	for range n {
		grp := &t.groups[g]
		ctrl := binary.LittleEndian.Uint64(grp.ctrl[:])
		for match := zeroBytes(ctrl ^ pattern); match != 0; match &= match - 1 {
			i := bits.TrailingZeros64(match) / 8
			if grp.keys[i] == *k {
				return g, i, true
			}
		}
		if zeroBytes(ctrl) != 0 { // an empty slot ends the probe
			return 0, 0, false
		}
		if g++; g == n {
			g = 0
		}
	}
	return 0, 0, false
}

// insertNew puts k, which the table does not hold, in the first empty or
// deleted slot of its probe. There is room.
func (t *groupTable) insertNew(k *[16]byte, h uint64, v uint32) {
	n := len(t.groups)
	g, c := t.home(h)
	for {
		grp := &t.groups[g]
		ctrl := binary.LittleEndian.Uint64(grp.ctrl[:])
		// Empty (0x00) and deleted (0x01) bytes both lack the high bit.
		if free := ^ctrl & msb; free != 0 {
			i := bits.TrailingZeros64(free) / 8
			if grp.ctrl[i] == ctrlDeleted {
				t.deleted--
			}
			grp.ctrl[i], grp.keys[i], grp.vals[i] = c, *k, v
			t.full++
			return
		}
		if g++; g == n {
			g = 0
		}
	}
}

// deleteAt empties slot i of group g, which is full.
func (t *groupTable) deleteAt(g, i int) {
	grp := &t.groups[g]
	// A group with an empty slot never had a probe pass it, so its slots
	// can go back to empty; in a full group a tombstone keeps probes going.
	if zeroBytes(binary.LittleEndian.Uint64(grp.ctrl[:])) != 0 {
		grp.ctrl[i] = ctrlEmpty
	} else {
		grp.ctrl[i] = ctrlDeleted
		t.deleted++
	}
	t.full--
}

// each calls f for every entry, deleting those for which it returns true,
// and returns how many it deleted.
func (t *groupTable) each(f func(k *[16]byte, v *uint32) (remove bool)) int {
	n := 0
	for g := range t.groups {
		grp := &t.groups[g]
		for full := binary.LittleEndian.Uint64(grp.ctrl[:]) & msb; full != 0; full &= full - 1 {
			i := bits.TrailingZeros64(full) / 8
			if f(&grp.keys[i], &grp.vals[i]) {
				t.deleteAt(g, i)
				n++
			}
		}
	}
	return n
}

// release gives the table's memory back and empties it.
func (t *groupTable) release() {
	freeGroups(t.mem)
	*t = groupTable{}
}

// fpHash is the in-shard hash of a key: bits of it that did not pick the
// shard (table.go picks shards by the key's shardHash, from bytes 8 to 15,
// mixed for IP keys). Bytes 0 to 7, mixed so that IP keys (mostly zero
// bytes) spread too.
func fpHash(k *[16]byte) uint64 {
	return mix64(binary.LittleEndian.Uint64(k[:8]) ^ bits.RotateLeft64(binary.LittleEndian.Uint64(k[8:]), 29))
}

// pageGroups returns how many groups fit in one page: the least a map
// maps.
func pageGroups() int { return os.Getpagesize() / groupSize }

// allocGroups returns n or more zeroed groups (as many as fill whole
// pages) in memory mapped for them, and the mapping; or, if mmap fails, n
// groups on the Go heap and a nil mapping.
func allocGroups(n int) ([]slotGroup, []byte) {
	page := os.Getpagesize()
	size := (n*groupSize + page - 1) / page * page
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return make([]slotGroup, n), nil
	}
	return unsafe.Slice((*slotGroup)(unsafe.Pointer(&mem[0])), size/groupSize), mem
}

// freeGroups unmaps memory that allocGroups mapped.
func freeGroups(mem []byte) {
	if mem != nil {
		unix.Munmap(mem)
	}
}
