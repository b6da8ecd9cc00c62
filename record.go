package main

import (
	"errors"
	"time"
)

// This file holds what every state-file format shares: the kinds of entry,
// the error for a damaged file, and what a load reports. The formats
// (snapshot.go, perlsave.go) build on it and on the table's records
// (table.go); statefile.go reads and writes whichever format a file has.

// The kinds of table entry, as snapshot blocks number them.
const (
	blockKnown = 1 // a known IP: client key, last seen
	blockGrey  = 2 // a grey triplet: triplet key, first seen
	blockList  = 3 // a greylistd entry: data key, first and last seen, count, list
)

// errCorrupt marks a snapshot that cannot be trusted.
var errCorrupt = errors.New("corrupt snapshot")

// loadStats describes what a load found.
type loadStats struct {
	format  string // "missing", "empty", "msgpack" or "perl"
	known   int    // known IPs loaded
	grey    int    // grey triplets loaded
	lists   int    // greylistd entries loaded
	expired int    // entries skipped because they had expired
	bad     int    // Perl save-file lines that could not be read
	written time.Time
	policy  *Policy // the limits a snapshot was written with; nil for a Perl save file
}
