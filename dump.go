package main

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
)

// dumpFile writes the state file at path (a snapshot or a Perl save file) to
// w as Perl save-file lines: every I line, then every G line, then, in a
// line form of greydaemon's own, every greylistd entry:
//
//	L <list> <first seen> <last seen> <count> #<hex>
//
// Nothing is filtered out. Keys held only as fingerprints are written as
// "#<hex>".
func dumpFile(path string, w io.Writer) error {
	data, err := readStateFile(path)
	if err != nil {
		return err
	}
	type entry struct {
		k [16]byte
		t uint32
	}
	var known, grey []entry
	add := func(kind int, k [16]byte, t uint32) bool {
		if kind == blockKnown {
			known = append(known, entry{k, t})
		} else {
			grey = append(grey, entry{k, t})
		}
		return true
	}
	type listed struct {
		k listKey
		e listEntry
	}
	var lists []listed
	addList := func(k listKey, e listEntry) bool {
		lists = append(lists, listed{k, e})
		return true
	}
	if _, err := decodeStateFile(data, add, addList); err != nil {
		return fmt.Errorf("%q: %w", path, err)
	}
	bw := bufio.NewWriter(w)
	var line []byte
	for _, e := range known {
		line = append(line[:0], "I "...)
		line = strconv.AppendUint(line, uint64(e.t), 10)
		line = append(line, ' ')
		if addr, ok := clientKey(e.k).addr(); ok {
			line = addr.AppendTo(line)
		} else {
			line = appendFingerprint(line, e.k)
		}
		bw.Write(append(line, '\n'))
	}
	for _, e := range grey {
		line = append(line[:0], "G "...)
		line = strconv.AppendUint(line, uint64(e.t), 10)
		line = append(line, ' ')
		line = appendFingerprint(line, e.k)
		bw.Write(append(line, '\n'))
	}
	for _, l := range lists {
		line = append(line[:0], "L "...)
		line = append(line, l.e.state.String()...)
		for _, n := range [...]uint32{l.e.first, l.e.last, l.e.count} {
			line = append(line, ' ')
			line = strconv.AppendUint(line, uint64(n), 10)
		}
		line = append(line, ' ')
		line = appendFingerprint(line, l.k)
		bw.Write(append(line, '\n'))
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("cannot write dump: %w", err)
	}
	return nil
}
