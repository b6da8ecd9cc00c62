package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/zeebo/xxh3"
)

// sealedSnapshot builds a snapshot whose checksum is right, so that the
// decoder's other checks are reached: version, blocks (kind, count and
// bytes as given), the trailer's counts, and extra bytes after them.
func sealedSnapshot(version uint64, blocks [][3]any, known, grey uint64, extra []byte) []byte {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.EncodeString(snapshotMagic)
	enc.EncodeUint(version)
	enc.EncodeInt(1_700_000_000)
	enc.EncodeArrayLen(3)
	enc.EncodeUint(604800)
	enc.EncodeUint(43200)
	enc.EncodeUint(300)
	for _, b := range blocks {
		enc.EncodeUint(b[0].(uint64))
		enc.EncodeUint(b[1].(uint64))
		enc.EncodeBytes(b[2].([]byte))
	}
	enc.EncodeUint(blockEnd)
	enc.EncodeUint(known)
	enc.EncodeUint(grey)
	buf.Write(extra)
	sum := binary.BigEndian.AppendUint64([]byte{0xcf}, xxh3.Hash(buf.Bytes()))
	return append(buf.Bytes(), sum...)
}

// TestSnapshotDecoderChecksBehindTheChecksum damages snapshots and then
// recomputes their checksum: each damage is still refused, with its own
// reason, and a correct one loads.
func TestSnapshotDecoderChecksBehindTheChecksum(t *testing.T) {
	entry := func(n int, size int) []byte {
		b := make([]byte, n*size)
		for i := range n {
			b[i*size] = byte(i + 1) // distinct keys
			binary.BigEndian.PutUint32(b[i*size+16:], 1_700_000_000)
		}
		return b
	}
	list := entry(1, 29)
	binary.BigEndian.PutUint32(list[20:], 1_700_000_000)
	binary.BigEndian.PutUint32(list[24:], 1)
	good := sealedSnapshot(1, [][3]any{{uint64(1), uint64(2), entry(2, 20)}, {uint64(2), uint64(1), entry(1, 20)}}, 2, 1, nil)
	var kinds []int
	if _, err := decodeSnapshot(good, func(kind int, _ [16]byte, _ uint32) bool { kinds = append(kinds, kind); return true }, nil); err != nil || len(kinds) != 3 {
		t.Fatalf("a correct snapshot: %v, %d entries", err, len(kinds))
	}
	badList := bytes.Clone(list)
	badList[28] = 7
	goodList := bytes.Clone(list)
	goodList[28] = byte(listWhite)
	if _, err := decodeSnapshot(sealedSnapshot(1, [][3]any{{uint64(3), uint64(1), goodList}}, 0, 0, nil),
		func(int, [16]byte, uint32) bool { return true }, func(listKey, listEntry) bool { return true }); err != nil {
		t.Fatalf("a correct greylistd block: %v", err)
	}
	for _, tt := range []struct {
		name string
		file []byte
		want string
	}{
		{"version 2", sealedSnapshot(2, nil, 0, 0, nil), "unknown format version 2 (this greydaemon reads 1)"},
		{"stray bytes", sealedSnapshot(1, nil, 0, 0, []byte{0xc0, 0xc0}), "2 stray bytes after the entries"},
		{"known count off", sealedSnapshot(1, [][3]any{{uint64(1), uint64(2), entry(2, 20)}}, 3, 0, nil), "entry counts do not match (known 2 of 3, grey 0 of 0)"},
		{"grey count off", sealedSnapshot(1, [][3]any{{uint64(2), uint64(1), entry(1, 20)}}, 0, 0, nil), "entry counts do not match (known 0 of 0, grey 1 of 0)"},
		{"unknown kind", sealedSnapshot(1, [][3]any{{uint64(9), uint64(1), entry(1, 20)}}, 0, 0, nil), "unknown block kind 9"},
		{"block size", sealedSnapshot(1, [][3]any{{uint64(1), uint64(1), entry(2, 20)}}, 1, 0, nil), "bad block size 40 for 1 entries"},
		{"block count", sealedSnapshot(1, [][3]any{{uint64(1), uint64(9), entry(2, 20)}}, 9, 0, nil), "bad block count 9"},
		{"greylistd list 7", sealedSnapshot(1, [][3]any{{uint64(3), uint64(1), badList}}, 0, 0, nil), "unknown greylistd list 7"},
	} {
		_, err := decodeSnapshot(tt.file, func(int, [16]byte, uint32) bool { return true }, func(listKey, listEntry) bool { return true })
		if !errors.Is(err, errCorrupt) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v; want %q", tt.name, err, tt.want)
		}
	}
}
