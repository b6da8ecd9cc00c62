package main

import (
	"encoding/binary"
	"errors"
	"time"
)

// This file holds what every state-file format shares: the record of one
// table entry, the kinds of entry, and what a load reports. The formats
// (snapshot.go, perlsave.go) build on it; statefile.go reads and writes
// whichever format a file has.

// The kinds of table entry, as snapshot blocks number them.
const (
	blockKnown = 1 // a known IP: client key, last seen
	blockGrey  = 2 // a grey triplet: triplet key, first seen
)

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

// errCorrupt marks a snapshot that cannot be trusted.
var errCorrupt = errors.New("corrupt snapshot")

// loadStats describes what a load found.
type loadStats struct {
	format  string // "missing", "empty", "msgpack" or "perl"
	known   int    // known IPs loaded
	grey    int    // grey triplets loaded
	expired int    // entries skipped because they had expired
	bad     int    // Perl save-file lines that could not be read
	written time.Time
	policy  *Policy // the limits a snapshot was written with; nil for a Perl save file
}
