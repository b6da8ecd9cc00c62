package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
)

// The Perl daemon's save file is text, one entry per line:
//
//	I <unix-time> <ip>
//	G <unix-time> <ip> <sender> <rcpt>
//
// where the G line's "<ip> <sender> <rcpt>" is the lowercased triplet key.
// greydaemon reads it so that admins migrate without re-greylisting anyone,
// and `greydaemon dump` writes it. Since greydaemon keeps triplet
// fingerprints rather than text, dump writes a G line's key as "#<32 hex
// digits>" (and an I line's non-IP client likewise); greydaemon reads such
// lines back exactly, and the Perl daemon loads them as keys that never
// match.

// maxBadLineReports bounds how many unreadable lines a load reports.
const maxBadLineReports = 5

// readPerlSave reads a Perl save file, calling add for every entry; add
// reports whether it kept the entry (false: expired). Lines it cannot read
// are counted and skipped. A file in which no line could be read, but some
// could not, is not a save file at all: the error wraps errCorrupt.
func readPerlSave(r io.Reader, add func(kind int, k [16]byte, t uint32) bool) (loadStats, error) {
	st := loadStats{format: "perl"}
	var kb keyBuilder
	var firstBad []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := bytes.TrimRight(sc.Bytes(), "\r")
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		kind, k, t, err := parsePerlLine(&kb, line)
		if err != nil {
			st.bad++
			if len(firstBad) < maxBadLineReports {
				firstBad = append(firstBad, fmt.Sprintf("line %d: %v", lineNo, err))
			}
			continue
		}
		switch {
		case !add(kind, k, t):
			st.expired++
		case kind == blockKnown:
			st.known++
		default:
			st.grey++
		}
	}
	if err := sc.Err(); err != nil {
		return st, fmt.Errorf("%w: line %d: %v", errCorrupt, lineNo+1, err)
	}
	if st.bad > 0 && st.known+st.grey+st.expired == 0 {
		return st, fmt.Errorf("%w: neither a snapshot nor a Perl save file (%s)", errCorrupt, firstBad[0])
	}
	return st, nil
}

// parsePerlLine parses one save-file line.
func parsePerlLine(kb *keyBuilder, line []byte) (kind int, k [16]byte, t uint32, err error) {
	tag, rest, ok := bytes.Cut(line, []byte{' '})
	if !ok || len(tag) != 1 {
		return 0, k, 0, fmt.Errorf("not an I or G line")
	}
	timeText, key, ok := bytes.Cut(rest, []byte{' '})
	if !ok || len(key) == 0 {
		return 0, k, 0, fmt.Errorf("missing key")
	}
	secs, err := strconv.ParseUint(string(timeText), 10, 32)
	if err != nil {
		return 0, k, 0, fmt.Errorf("bad time %q", timeText)
	}
	t = uint32(secs)
	if fp, ok := parseFingerprint(key); ok {
		switch tag[0] {
		case 'I':
			return blockKnown, fp, t, nil
		case 'G':
			return blockGrey, fp, t, nil
		}
	}
	switch tag[0] {
	case 'I':
		ck, _, _ := makeClientKey(key)
		return blockKnown, ck, t, nil
	case 'G':
		// The key is "<ip> <sender> <rcpt>"; sender and recipient hold no
		// spaces, so they are the last two words and the IP is the rest.
		i := bytes.LastIndexByte(key, ' ')
		if i <= 0 {
			return 0, k, 0, fmt.Errorf("a G line needs ip, sender and recipient")
		}
		rcpt := key[i+1:]
		j := bytes.LastIndexByte(key[:i], ' ')
		if j <= 0 {
			return 0, k, 0, fmt.Errorf("a G line needs ip, sender and recipient")
		}
		ip, sender := key[:j], key[j+1:i]
		ck, _, _ := makeClientKey(ip)
		return blockGrey, kb.triplet(ck, sender, rcpt), t, nil
	}
	return 0, k, 0, fmt.Errorf("unknown line type %q", tag)
}

// parseFingerprint parses "#<32 hex digits>", dump's form of a key it cannot
// write as text.
func parseFingerprint(b []byte) ([16]byte, bool) {
	var raw [16]byte
	if len(b) != 33 || b[0] != '#' {
		return raw, false
	}
	if _, err := hex.Decode(raw[:], b[1:]); err != nil {
		return raw, false
	}
	return raw, true
}

// appendFingerprint appends "#<32 hex digits>" for k.
func appendFingerprint(dst []byte, k [16]byte) []byte {
	dst = append(dst, '#')
	return hex.AppendEncode(dst, k[:])
}
