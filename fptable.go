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
// An fpMap is not safe for concurrent use; its shard's lock guards it.
type fpMap struct {
	groups  []slotGroup
	mem     []byte // the mapping the groups live in; nil for none or heap memory
	count   int    // full slots
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

	lsb = 0x0101010101010101
	msb = 0x8080808080808080
)

// zeroBytes returns a word with the high bit set in each byte of x that is
// zero (and possibly in bytes above one that is: callers check the key).
func zeroBytes(x uint64) uint64 { return (x - lsb) &^ x & msb }

// len returns the number of entries.
func (m *fpMap) len() int { return m.count }

// slots returns the number of slots.
func (m *fpMap) slots() int { return len(m.groups) * groupSlots }

// bytes returns the memory the map holds.
func (m *fpMap) bytes() int { return len(m.groups) * groupSize }

// home returns the group where the probe for hash h starts, and h's control
// byte.
func (m *fpMap) home(h uint64) (int, uint8) {
	g, _ := bits.Mul64(h, uint64(len(m.groups)))
	return int(g), ctrlFull | uint8(h&0x7f)
}

// find returns the group and slot of k, or ok false.
func (m *fpMap) find(k *[16]byte) (g, i int, ok bool) {
	n := len(m.groups)
	if n == 0 {
		return 0, 0, false
	}
	g, c := m.home(fpHash(k))
	pattern := lsb * uint64(c)
	for range n {
		grp := &m.groups[g]
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

// get returns the value of k.
func (m *fpMap) get(k *[16]byte) (uint32, bool) {
	g, i, ok := m.find(k)
	if !ok {
		return 0, false
	}
	return m.groups[g].vals[i], true
}

// set sets the value of k, inserting it if it is new, and reports whether
// it was new.
func (m *fpMap) set(k *[16]byte, v uint32) bool {
	if g, i, ok := m.find(k); ok {
		m.groups[g].vals[i] = v
		return false
	}
	m.insert(k, v)
	return true
}

// insert adds k, which the map does not hold, with value v, growing the map
// if it is full.
func (m *fpMap) insert(k *[16]byte, v uint32) {
	if (m.count+m.deleted+1)*maxLoadDen > m.slots()*maxLoadNum {
		m.resize(m.count + 1)
	}
	m.insertNew(k, v)
}

// reserve makes room for want entries in all, filling the slots to
// reserveLoad, unless the map has that room already: a load that knows how
// many entries are coming sizes the map once.
func (m *fpMap) reserve(want int) {
	if groups := int(float64(want)/reserveLoad/groupSlots) + 1; groups > len(m.groups) {
		m.resizeTo(groups)
	}
}

// insertNew puts k, which the map does not hold, in the first empty or
// deleted slot of its probe. There is room.
func (m *fpMap) insertNew(k *[16]byte, v uint32) {
	n := len(m.groups)
	g, c := m.home(fpHash(k))
	for {
		grp := &m.groups[g]
		ctrl := binary.LittleEndian.Uint64(grp.ctrl[:])
		// Empty (0x00) and deleted (0x01) bytes both lack the high bit.
		if free := ^ctrl & msb; free != 0 {
			i := bits.TrailingZeros64(free) / 8
			if grp.ctrl[i] == ctrlDeleted {
				m.deleted--
			}
			grp.ctrl[i], grp.keys[i], grp.vals[i] = c, *k, v
			m.count++
			return
		}
		if g++; g == n {
			g = 0
		}
	}
}

// deleteAt empties slot i of group g, which is full.
func (m *fpMap) deleteAt(g, i int) {
	grp := &m.groups[g]
	// A group with an empty slot never had a probe pass it, so its slots
	// can go back to empty; in a full group a tombstone keeps probes going.
	if zeroBytes(binary.LittleEndian.Uint64(grp.ctrl[:])) != 0 {
		grp.ctrl[i] = ctrlEmpty
	} else {
		grp.ctrl[i] = ctrlDeleted
		m.deleted++
	}
	m.count--
}

// each calls f for every entry, with a pointer to its value (which f may
// change); when f returns true, the entry is deleted.
func (m *fpMap) each(f func(k *[16]byte, v *uint32) (remove bool)) {
	for g := range m.groups {
		grp := &m.groups[g]
		for full := binary.LittleEndian.Uint64(grp.ctrl[:]) & msb; full != 0; full &= full - 1 {
			i := bits.TrailingZeros64(full) / 8
			if f(&grp.keys[i], &grp.vals[i]) {
				m.deleteAt(g, i)
			}
		}
	}
}

// clear removes every entry and gives the memory back.
func (m *fpMap) clear() {
	m.free()
	m.groups, m.count, m.deleted = nil, 0, 0
}

// shrink resizes a map that holds far fewer entries than it has room for,
// so that a sweep gives memory back.
func (m *fpMap) shrink() {
	if m.slots() > 4*groupSlots*pageGroups() && float64(m.count) < shrinkBelow*float64(m.slots()) {
		m.resize(m.count)
	}
}

// resize moves the entries to new groups with room for want entries at
// resizeLoad, dropping the tombstones, and frees the old ones.
func (m *fpMap) resize(want int) {
	m.resizeTo(int(float64(want)/resizeLoad/groupSlots) + 1)
}

// resizeTo moves the entries to groups new groups (or more: whole pages).
func (m *fpMap) resizeTo(groups int) {
	old, oldMem := m.groups, m.mem
	m.groups, m.mem = allocGroups(groups)
	m.count, m.deleted = 0, 0
	for g := range old {
		grp := &old[g]
		for full := binary.LittleEndian.Uint64(grp.ctrl[:]) & msb; full != 0; full &= full - 1 {
			i := bits.TrailingZeros64(full) / 8
			m.insertNew(&grp.keys[i], grp.vals[i])
		}
	}
	freeGroups(oldMem)
}

// fpHash is the in-shard hash of a key: bits of it that did not pick the
// shard (table.go picks shards by the key's shardHash, from bytes 8 to 15,
// mixed for IP keys). Bytes 0 to 7, mixed so that IP keys (mostly zero
// bytes) spread too.
func fpHash(k *[16]byte) uint64 {
	return mix64(binary.LittleEndian.Uint64(k[:8]) ^ bits.RotateLeft64(binary.LittleEndian.Uint64(k[8:]), 29))
}

// free gives the map's memory back.
func (m *fpMap) free() {
	freeGroups(m.mem)
	m.mem = nil
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
