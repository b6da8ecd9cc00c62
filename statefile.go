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

	"github.com/zeebo/xxh3"
)

// A snapshotter writes the table to its state file and reads it back. Its
// buffers are reused across saves; save must not run concurrently with
// itself (the caller serialises saves).
type snapshotter struct {
	path   string
	table  *table
	policy func() Policy // the limits in force, read at each save and load
	now    func() time.Time

	// keepPerl is set after a Perl save file was loaded: the next save
	// first keeps the original as path+".perl".
	keepPerl bool

	scratch snapshotScratch
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
	if st.known, st.grey, err = encodeSnapshot(io.MultiWriter(bw, h), s.table, s.policy(), s.now(), &s.scratch); err != nil {
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
	exp := s.policy().expiry()
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
