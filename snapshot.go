package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/zeebo/xxh3"
)

// A snapshot file is one msgpack stream:
//
//	str   "greydaemon-snapshot"          magic
//	uint  1                              format version
//	int   unix time written
//	array [known_ip_lifetime, resend_window, min_resend_delay] in seconds
//	then blocks, one or two per table shard:
//	  uint kind (1 known IPs, 2 grey triplets), uint count,
//	  bin  count × 20 bytes: 16-byte key, 4-byte unix time, big-endian
//	  or, for a shard holding greylistd entries (greylistd.go):
//	  uint 3, uint count,
//	  bin  count × 29 bytes: 16-byte key, first seen, last seen, count
//	       (4 bytes each, big-endian), list (1 white, 2 grey, 3 black)
//	uint  0                              end of blocks
//	uint  total known IPs, uint total grey triplets
//	uint64 (always 9 bytes: 0xcf + 8)    xxh3-64 of every byte before it
//
// The bulk data is binary blocks rather than per-entry msgpack values: it
// is written and read without reflection and costs 20 bytes per entry.

const (
	snapshotMagic   = "greydaemon-snapshot"
	snapshotVersion = 1
	blockEnd        = 0
	checksumSize    = 9
	// maxBlockEntries bounds one block: a shard holds far fewer.
	maxBlockEntries = 1 << 24
)

// snapshotPrefix is how every snapshot file starts: the msgpack encoding of
// the magic string.
var snapshotPrefix = append([]byte{0xa0 | byte(len(snapshotMagic))}, snapshotMagic...)

// writeBlock writes a block of records, unless it is empty.
func writeBlock(enc *msgpack.Encoder, kind int, records []byte) error {
	if len(records) == 0 {
		return nil
	}
	if err := enc.EncodeUint(uint64(kind)); err != nil {
		return err
	}
	if err := enc.EncodeUint(uint64(len(records) / blockRecordSize(kind))); err != nil {
		return err
	}
	return enc.EncodeBytes(records)
}

// blockRecordSize returns the size of one record in a block of kind.
func blockRecordSize(kind int) int {
	if kind == blockList {
		return listRecordSize
	}
	return recordSize
}

// decodeSnapshot checks and decodes a snapshot file's bytes, calling add for
// every known IP and grey triplet and addList (when not nil) for every
// greylistd entry; each reports whether it kept the entry. Every count and
// length is checked against the bytes that remain before it is used.
func decodeSnapshot(data []byte, add func(kind int, k [16]byte, t uint32) bool, addList func(k listKey, e listEntry) bool) (loadStats, error) {
	st := loadStats{format: "msgpack"}
	if len(data) < len(snapshotPrefix)+checksumSize {
		return st, fmt.Errorf("%w: truncated (%d bytes)", errCorrupt, len(data))
	}
	body, sum := data[:len(data)-checksumSize], data[len(data)-checksumSize:]
	if sum[0] != 0xcf || binary.BigEndian.Uint64(sum[1:]) != xxh3.Hash(body) {
		return st, fmt.Errorf("%w: checksum mismatch (truncated or damaged)", errCorrupt)
	}
	r := bytes.NewReader(body)
	sd := &snapshotDecoder{r: r, dec: msgpack.NewDecoder(r), st: st, add: add, addList: addList}
	if err := sd.header(); err != nil {
		return sd.st, err
	}
	for {
		kind, err := sd.dec.DecodeUint64()
		if err != nil {
			return sd.st, sd.fail("bad block kind", err)
		}
		if kind == blockEnd {
			break
		}
		if err := sd.block(kind); err != nil {
			return sd.st, err
		}
	}
	return sd.st, sd.trailer()
}

// A snapshotDecoder reads a snapshot's body (checksum checked), counting
// what it hands to add and addList in st.
type snapshotDecoder struct {
	r       *bytes.Reader
	dec     *msgpack.Decoder
	st      loadStats
	add     func(kind int, k [16]byte, t uint32) bool
	addList func(k listKey, e listEntry) bool
	// The entries the known-IP and grey blocks held, for the trailer.
	totalKnown, totalGrey uint64
}

// fail returns the error for damage what, found with err (which may be
// nil).
func (sd *snapshotDecoder) fail(what string, err error) error {
	if err == nil {
		return fmt.Errorf("%w: %s", errCorrupt, what)
	}
	return fmt.Errorf("%w: %s: %v", errCorrupt, what, err)
}

// header reads the magic, the version, the time written and the limits.
func (sd *snapshotDecoder) header() error {
	dec := sd.dec
	magic := make([]byte, len(snapshotPrefix))
	if err := dec.ReadFull(magic); err != nil || !bytes.Equal(magic, snapshotPrefix) {
		return sd.fail("bad magic", err)
	}
	version, err := dec.DecodeUint64()
	if err != nil {
		return sd.fail("bad version", err)
	}
	if version != snapshotVersion {
		return sd.fail(fmt.Sprintf("unknown format version %d (this greydaemon reads %d)", version, snapshotVersion), nil)
	}
	written, err := dec.DecodeInt64()
	if err != nil {
		return sd.fail("bad time written", err)
	}
	sd.st.written = time.Unix(written, 0)
	n, err := dec.DecodeArrayLen()
	if err != nil || n < 0 || n > 64 {
		return sd.fail("bad settings", err)
	}
	var limits [3]uint64
	for i := range n {
		v, err := dec.DecodeUint64()
		if err != nil {
			return sd.fail("bad settings", err)
		}
		if i < len(limits) {
			limits[i] = v
		}
	}
	if n >= 3 && limits[0] <= math.MaxUint32 && limits[1] <= math.MaxUint32 && limits[2] <= math.MaxUint32 {
		sd.st.policy = &Policy{KnownIPLifetime: uint32(limits[0]), ResendWindow: uint32(limits[1]), MinResendDelay: uint32(limits[2])}
	}
	return nil
}

// block reads one block of kind and hands its entries on.
func (sd *snapshotDecoder) block(kind uint64) error {
	if kind != blockKnown && kind != blockGrey && kind != blockList {
		return sd.fail(fmt.Sprintf("unknown block kind %d", kind), nil)
	}
	rsize := uint64(blockRecordSize(int(kind)))
	count, err := sd.dec.DecodeUint64()
	if err != nil || count > maxBlockEntries || count*rsize > uint64(sd.r.Len()) {
		return sd.fail(fmt.Sprintf("bad block count %d", count), err)
	}
	size, err := sd.dec.DecodeBytesLen()
	if err != nil || uint64(size) != count*rsize || size > sd.r.Len() {
		return sd.fail(fmt.Sprintf("bad block size %d for %d entries", size, count), err)
	}
	block := make([]byte, size)
	if err := sd.dec.ReadFull(block); err != nil {
		return sd.fail("short block", err)
	}
	if kind == blockList {
		return sd.listBlock(block)
	}
	for e := block; len(e) >= recordSize; e = e[recordSize:] {
		k, t := parseRecord(e)
		switch {
		case !sd.add(int(kind), k, t):
			sd.st.expired++
		case kind == blockKnown:
			sd.st.known++
		default:
			sd.st.grey++
		}
	}
	if kind == blockKnown {
		sd.totalKnown += count
	} else {
		sd.totalGrey += count
	}
	return nil
}

// listBlock hands on the greylistd entries of a block.
func (sd *snapshotDecoder) listBlock(block []byte) error {
	for e := block; len(e) >= listRecordSize; e = e[listRecordSize:] {
		k, entry, ok := parseListRecord(e)
		switch {
		case !ok:
			return sd.fail(fmt.Sprintf("unknown greylistd list %d", entry.state), nil)
		case sd.addList == nil:
		case sd.addList(k, entry):
			sd.st.lists++
		default:
			sd.st.expired++
		}
	}
	return nil
}

// trailer reads the entry counts after the blocks, which must match them,
// and checks that nothing follows.
func (sd *snapshotDecoder) trailer() error {
	wantKnown, err1 := sd.dec.DecodeUint64()
	wantGrey, err2 := sd.dec.DecodeUint64()
	if err := errors.Join(err1, err2); err != nil || wantKnown != sd.totalKnown || wantGrey != sd.totalGrey {
		return sd.fail(fmt.Sprintf("entry counts do not match (known %d of %d, grey %d of %d)",
			sd.totalKnown, wantKnown, sd.totalGrey, wantGrey), err)
	}
	if sd.r.Len() != 0 {
		return sd.fail(fmt.Sprintf("%d stray bytes after the entries", sd.r.Len()), nil)
	}
	return nil
}

// snapshotScratch is the memory encodeSnapshot copies a shard into,
// reused from save to save.
type snapshotScratch struct {
	known, grey, lists []byte
}

// encodeSnapshot writes the snapshot body of t (everything but the
// checksum) to w, copying one shard at a time under its read lock, and
// returns how many entries it wrote.
func encodeSnapshot(w io.Writer, t *table, p Policy, written time.Time, sc *snapshotScratch) (known, grey int, err error) {
	enc := msgpack.NewEncoder(w)
	for _, err := range []error{
		enc.EncodeString(snapshotMagic),
		enc.EncodeUint(snapshotVersion),
		enc.EncodeInt(written.Unix()),
		enc.EncodeArrayLen(3),
		enc.EncodeUint(uint64(p.KnownIPLifetime)),
		enc.EncodeUint(uint64(p.ResendWindow)),
		enc.EncodeUint(uint64(p.MinResendDelay)),
	} {
		if err != nil {
			return 0, 0, err
		}
	}
	for i := range t.shards {
		sc.known, sc.grey = t.appendShardRecords(i, sc.known[:0], sc.grey[:0])
		if err := writeBlock(enc, blockKnown, sc.known); err != nil {
			return 0, 0, err
		}
		if err := writeBlock(enc, blockGrey, sc.grey); err != nil {
			return 0, 0, err
		}
		known += len(sc.known) / recordSize
		grey += len(sc.grey) / recordSize
		sc.lists = t.appendShardLists(i, sc.lists[:0])
		if err := writeBlock(enc, blockList, sc.lists); err != nil {
			return 0, 0, err
		}
	}
	for _, err := range []error{
		enc.EncodeUint(blockEnd),
		enc.EncodeUint(uint64(known)),
		enc.EncodeUint(uint64(grey)),
	} {
		if err != nil {
			return 0, 0, err
		}
	}
	return known, grey, nil
}
