package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
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
	blockKnown      = 1
	blockGrey       = 2
	checksumSize    = 9
	// maxBlockEntries bounds one block: a shard holds far fewer.
	maxBlockEntries = 1 << 24
)

// snapshotPrefix is how every snapshot file starts: the msgpack encoding of
// the magic string.
var snapshotPrefix = append([]byte{0xa0 | byte(len(snapshotMagic))}, snapshotMagic...)

// errCorrupt marks a snapshot that cannot be trusted.
var errCorrupt = errors.New("corrupt snapshot")

// A snapshotter writes the table to its state file and reads it back. Its
// buffers are reused across saves; save must not run concurrently with
// itself (the caller serialises saves).
type snapshotter struct {
	path   string
	table  *table
	policy Policy
	now    func() time.Time

	// keepPerl is set after a Perl save file was loaded: the next save
	// first keeps the original as path+".perl".
	keepPerl bool

	// Records of the shard being written, reused from save to save.
	known, grey []byte
}

// saveStats describes one save.
type saveStats struct {
	known, grey int
	bytes       int64
	elapsed     time.Duration
}

// save writes the table to s.path atomically and durably: a new file in the
// same directory, flushed, synced, closed, renamed over the old one, and the
// directory synced. On any error the new file is removed and the old
// snapshot stays as it was.
func (s *snapshotter) save() (st saveStats, err error) {
	start := time.Now()
	if s.keepPerl {
		if err := keepOriginal(s.path, s.path+".perl"); err != nil {
			return st, err
		}
		s.keepPerl = false
	}
	dir, base := filepath.Split(s.path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, base+".tmp-*")
	if err != nil {
		return st, fmt.Errorf("cannot create temporary file for %q: %w", s.path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	cw := &countingWriter{w: f}
	bw := bufio.NewWriterSize(cw, 1<<20)
	h := xxh3.New()
	if err = s.encode(io.MultiWriter(bw, h), &st); err != nil {
		return st, fmt.Errorf("cannot write %q: %w", tmp, err)
	}
	var sum [checksumSize]byte
	sum[0] = 0xcf
	binary.BigEndian.PutUint64(sum[1:], h.Sum64())
	if _, err = bw.Write(sum[:]); err != nil {
		return st, fmt.Errorf("cannot write %q: %w", tmp, err)
	}
	if err = bw.Flush(); err != nil {
		return st, fmt.Errorf("cannot write %q: %w", tmp, err)
	}
	if err = f.Sync(); err != nil {
		return st, fmt.Errorf("cannot sync %q: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return st, fmt.Errorf("cannot close %q: %w", tmp, err)
	}
	if err = os.Rename(tmp, s.path); err != nil {
		return st, fmt.Errorf("cannot rename %q to %q: %w", tmp, s.path, err)
	}
	if err = syncDir(dir); err != nil {
		// The new snapshot is in place; only its durability is in doubt.
		return st, fmt.Errorf("cannot sync directory %q: %w", dir, err)
	}
	st.bytes, st.elapsed = cw.n, time.Since(start)
	return st, nil
}

// encode writes the snapshot body (everything but the checksum) to w,
// copying one shard at a time under its read lock.
func (s *snapshotter) encode(w io.Writer, st *saveStats) error {
	enc := msgpack.NewEncoder(w)
	p := s.policy
	for _, err := range []error{
		enc.EncodeString(snapshotMagic),
		enc.EncodeUint(snapshotVersion),
		enc.EncodeInt(s.now().Unix()),
		enc.EncodeArrayLen(3),
		enc.EncodeUint(uint64(p.KnownIPLifetime)),
		enc.EncodeUint(uint64(p.ResendWindow)),
		enc.EncodeUint(uint64(p.MinResendDelay)),
	} {
		if err != nil {
			return err
		}
	}
	for i := range s.table.shards {
		s.known, s.grey = s.table.appendShardRecords(i, s.known[:0], s.grey[:0])
		if err := writeBlock(enc, blockKnown, s.known); err != nil {
			return err
		}
		if err := writeBlock(enc, blockGrey, s.grey); err != nil {
			return err
		}
		st.known += len(s.known) / recordSize
		st.grey += len(s.grey) / recordSize
	}
	for _, err := range []error{
		enc.EncodeUint(blockEnd),
		enc.EncodeUint(uint64(st.known)),
		enc.EncodeUint(uint64(st.grey)),
	} {
		if err != nil {
			return err
		}
	}
	return nil
}

// writeBlock writes a block of records, unless it is empty.
func writeBlock(enc *msgpack.Encoder, kind int, records []byte) error {
	if len(records) == 0 {
		return nil
	}
	if err := enc.EncodeUint(uint64(kind)); err != nil {
		return err
	}
	if err := enc.EncodeUint(uint64(len(records) / recordSize)); err != nil {
		return err
	}
	return enc.EncodeBytes(records)
}

// A countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// syncDir fsyncs a directory so that a rename in it survives a crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// keepOriginal makes a second name, keep, for the file at path, unless keep
// exists already. It never overwrites.
func keepOriginal(path, keep string) error {
	if _, err := os.Lstat(keep); err == nil {
		return nil
	}
	if err := os.Link(path, keep); err != nil && !errors.Is(err, fs.ErrExist) {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // nothing to keep
		}
		return fmt.Errorf("cannot keep the Perl save file as %q: %w", keep, err)
	}
	return nil
}

// loadStats describes what a load found.
type loadStats struct {
	format  string // "missing", "empty", "msgpack" or "perl"
	known   int    // known IPs loaded
	grey    int    // grey triplets loaded
	expired int    // entries skipped because they had expired
	bad     int    // Perl save-file lines that could not be read
	written time.Time
}

// load reads the state file into the table. A missing or empty file loads
// nothing. A file that is neither a valid snapshot nor a Perl save file gets
// an error wrapping errCorrupt; the table may then hold part of it, so the
// caller should start over with an empty table.
func (s *snapshotter) load() (loadStats, error) {
	s.removeStaleTemps()
	data, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return loadStats{format: "missing"}, nil
	}
	if err != nil {
		return loadStats{}, fmt.Errorf("cannot read %q: %w", s.path, err)
	}
	now := uint32(s.now().Unix())
	st, err := decodeStateFile(data, func(kind int, k [16]byte, t uint32) bool {
		return s.restore(kind, k, t, now)
	})
	if err != nil {
		return st, fmt.Errorf("%q: %w", s.path, err)
	}
	s.keepPerl = st.format == "perl"
	return st, nil
}

// decodeStateFile decodes the contents of a state file, whichever form it
// has: empty, a snapshot, or a Perl save file. It calls add for every entry;
// add reports whether it kept the entry.
func decodeStateFile(data []byte, add func(kind int, k [16]byte, t uint32) bool) (loadStats, error) {
	switch {
	case len(data) == 0:
		return loadStats{format: "empty"}, nil
	case bytes.HasPrefix(data, snapshotPrefix):
		return decodeSnapshot(data, add)
	default:
		return readPerlSave(bytes.NewReader(data), add)
	}
}

// removeStaleTemps removes temporary files that a save killed midway (by
// SIGKILL or a crash) left next to the state file. Only names that save
// itself makes are touched.
func (s *snapshotter) removeStaleTemps() {
	dir, base := filepath.Split(s.path)
	if dir == "" {
		dir = "."
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), base+".tmp-") && e.Type().IsRegular() {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// restore inserts one loaded entry unless it has expired, and reports
// whether it did.
func (s *snapshotter) restore(kind int, k [16]byte, t, now uint32) bool {
	exp := s.policy.expiry()
	switch kind {
	case blockKnown:
		if age(now, t) >= exp.knownLifetime {
			return false
		}
		s.table.restoreKnown(clientKey(k), t, now, exp)
	case blockGrey:
		if age(now, t) >= exp.greyLifetime {
			return false
		}
		s.table.restoreGrey(tripletKey(k), t, now, exp)
	}
	return true
}

// decodeSnapshot checks and decodes a snapshot file's bytes, calling add for
// every entry; add reports whether it kept the entry. Every count and length
// is checked against the bytes that remain before it is used.
func decodeSnapshot(data []byte, add func(kind int, k [16]byte, t uint32) bool) (loadStats, error) {
	st := loadStats{format: "msgpack"}
	if len(data) < len(snapshotPrefix)+checksumSize {
		return st, fmt.Errorf("%w: truncated (%d bytes)", errCorrupt, len(data))
	}
	body, sum := data[:len(data)-checksumSize], data[len(data)-checksumSize:]
	if sum[0] != 0xcf || binary.BigEndian.Uint64(sum[1:]) != xxh3.Hash(body) {
		return st, fmt.Errorf("%w: checksum mismatch (truncated or damaged)", errCorrupt)
	}
	r := bytes.NewReader(body)
	dec := msgpack.NewDecoder(r)
	fail := func(what string, err error) (loadStats, error) {
		if err == nil {
			return st, fmt.Errorf("%w: %s", errCorrupt, what)
		}
		return st, fmt.Errorf("%w: %s: %v", errCorrupt, what, err)
	}
	magic := make([]byte, len(snapshotPrefix))
	if err := dec.ReadFull(magic); err != nil || !bytes.Equal(magic, snapshotPrefix) {
		return fail("bad magic", err)
	}
	version, err := dec.DecodeUint64()
	if err != nil {
		return fail("bad version", err)
	}
	if version != snapshotVersion {
		return fail(fmt.Sprintf("unknown format version %d (this greydaemon reads %d)", version, snapshotVersion), nil)
	}
	written, err := dec.DecodeInt64()
	if err != nil {
		return fail("bad time written", err)
	}
	st.written = time.Unix(written, 0)
	n, err := dec.DecodeArrayLen()
	if err != nil || n < 0 || n > 64 {
		return fail("bad settings", err)
	}
	for range n {
		if _, err := dec.DecodeUint64(); err != nil {
			return fail("bad settings", err)
		}
	}
	var totalKnown, totalGrey uint64
	for {
		kind, err := dec.DecodeUint64()
		if err != nil {
			return fail("bad block kind", err)
		}
		if kind == blockEnd {
			break
		}
		if kind != blockKnown && kind != blockGrey {
			return fail(fmt.Sprintf("unknown block kind %d", kind), nil)
		}
		count, err := dec.DecodeUint64()
		if err != nil || count > maxBlockEntries || count*recordSize > uint64(r.Len()) {
			return fail(fmt.Sprintf("bad block count %d", count), err)
		}
		size, err := dec.DecodeBytesLen()
		if err != nil || uint64(size) != count*recordSize || size > r.Len() {
			return fail(fmt.Sprintf("bad block size %d for %d entries", size, count), err)
		}
		block := make([]byte, size)
		if err := dec.ReadFull(block); err != nil {
			return fail("short block", err)
		}
		for e := block; len(e) >= recordSize; e = e[recordSize:] {
			k, t := parseRecord(e)
			switch {
			case !add(int(kind), k, t):
				st.expired++
			case kind == blockKnown:
				st.known++
			default:
				st.grey++
			}
		}
		if kind == blockKnown {
			totalKnown += count
		} else {
			totalGrey += count
		}
	}
	wantKnown, err1 := dec.DecodeUint64()
	wantGrey, err2 := dec.DecodeUint64()
	if err := errors.Join(err1, err2); err != nil || wantKnown != totalKnown || wantGrey != totalGrey {
		return fail(fmt.Sprintf("entry counts do not match (known %d of %d, grey %d of %d)",
			totalKnown, wantKnown, totalGrey, wantGrey), err)
	}
	if r.Len() != 0 {
		return fail(fmt.Sprintf("%d stray bytes after the entries", r.Len()), nil)
	}
	return st, nil
}

// setAside renames a damaged state file to path.corrupt-<unix time> (with a
// counter if that name is taken), never overwriting anything, and returns
// the new name.
func setAside(path string, now time.Time) (string, error) {
	for i := 0; i < 100; i++ {
		name := fmt.Sprintf("%s.corrupt-%d", path, now.Unix())
		if i > 0 {
			name += fmt.Sprintf(".%d", i)
		}
		err := os.Link(path, name)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("cannot set %q aside: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return name, fmt.Errorf("cannot remove %q after linking it to %q: %w", path, name, err)
		}
		return name, nil
	}
	return "", fmt.Errorf("cannot set %q aside: too many corrupt copies", path)
}
