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
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
	// warn, if set, logs a problem that does not stop a save.
	warn func(format string, args ...any)
	// grouping keys loaded known IPs by their network, as requests are.
	grouping addrGrouping

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
		// Once: a failure to keep the original must never block saving.
		s.keepPerl = false
		if err := keepOriginal(s.path, s.path+".perl"); err != nil && s.warn != nil {
			s.warn("%v; saving anyway, so the Perl save file is replaced (its entries are in the snapshot)", err)
		}
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
	data, err := readStateFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return loadStats{format: "missing"}, nil
	}
	if err != nil {
		return loadStats{}, err
	}
	now := uint32(s.now().Unix())
	if bytes.HasPrefix(data, snapshotPrefix) {
		// Size the grey maps once for what the file can hold (20 bytes a
		// record) rather than growing them step by step as they fill.
		s.table.reserveGrey(len(data) / recordSize)
	}
	st, err := decodeStateFile(data, func(kind int, k [16]byte, t uint32) bool {
		return s.restore(kind, k, t, now)
	}, func(k listKey, e listEntry) bool {
		exp := s.policy().expiry()
		if e.expired(now, exp) {
			return false
		}
		s.table.restoreList(k, e, now, exp)
		return true
	})
	if err != nil {
		return st, fmt.Errorf("%q: %w", s.path, err)
	}
	s.keepPerl = st.format == "perl"
	return st, nil
}

// readStateFile returns the contents of the state file at path. It refuses
// anything but a regular file: a named pipe would block the daemon's start
// for ever (and deaf to SIGTERM), a device would never end. An error for a
// missing file wraps fs.ErrNotExist.
func readStateFile(path string) ([]byte, error) {
	// O_NONBLOCK: opening a named pipe must not wait for a writer.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return nil, fmt.Errorf("cannot read state file %q as %s: %w; make it readable by that user (chown %s %q)",
				path, whoami(), err, userName(), path)
		}
		return nil, fmt.Errorf("cannot read state file %q: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("cannot read state file %q: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("state file %q is not a regular file (%s); give a path to a file, or to none yet", path, fileKind(fi.Mode()))
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("cannot read state file %q: %w", path, err)
	}
	return data, nil
}

// fileKind names the type of a file that is not a regular one.
func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	case m.IsDir():
		return "a directory"
	}
	return m.Type().String()
}

// checkStateDir checks that the directory of the state file at path
// exists, before anything is written in it.
func checkStateDir(path string) error {
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("the directory of state file %q does not exist; create it: mkdir -p %q", path, dir)
	}
	if err != nil {
		return fmt.Errorf("cannot use the directory of state file %q: %w", path, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("the directory of state file %q, %q, is not a directory", path, dir)
	}
	return nil
}

// checkStateAccess checks, with the privileges the daemon runs with, that
// it will be able to save: that it can create files in the state file's
// directory (each save writes a new file there and renames it). Without
// this check a directory the daemon cannot write would show only at the
// first save, minutes after start.
func checkStateAccess(path string) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, base+".tmp-probe-*")
	if err != nil {
		return fmt.Errorf("cannot create files in %q, the directory of state file %q, as %s: %w; make it writable by that user (chown %s %q)",
			dir, path, whoami(), err, userName(), dir)
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}

// whoami describes the user the process runs as, for errors.
func whoami() string {
	return fmt.Sprintf("user %s (uid %d)", userName(), os.Geteuid())
}

// userName returns the name of the user the process runs as, or its uid.
func userName() string {
	uid := strconv.Itoa(os.Geteuid())
	if u, err := user.LookupId(uid); err == nil {
		return u.Username
	}
	return uid
}

// decodeStateFile decodes the contents of a state file, whichever form it
// has: empty, a snapshot, or a Perl save file. It calls add for every known
// IP and grey triplet and addList (when not nil) for every greylistd entry;
// each reports whether it kept the entry.
func decodeStateFile(data []byte, add func(kind int, k [16]byte, t uint32) bool, addList func(k listKey, e listEntry) bool) (loadStats, error) {
	switch {
	case len(data) == 0:
		return loadStats{format: "empty"}, nil
	case bytes.HasPrefix(data, snapshotPrefix):
		return decodeSnapshot(data, add, addList)
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
		ck := clientKey(k)
		if addr, ok := ck.addr(); ok {
			// A snapshot written with other prefixes (or none, as every
			// Perl save file) keys its known IPs by another network.
			ck = clientKeyFromAddr(s.grouping.group(addr))
		}
		s.table.restoreKnown(ck, t, now, exp)
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

// keepOriginal makes keep a copy of the file at path, unless keep exists
// already; it never overwrites. It tries a hard link first, which costs
// nothing, and copies when linking is refused: with fs.protected_hardlinks
// (the default on Linux distributions) a user may not link a file that
// belongs to another, and a Perl save file typically belongs to root.
func keepOriginal(path, keep string) error {
	if _, err := os.Lstat(keep); err == nil {
		return nil
	}
	err := os.Link(path, keep)
	switch {
	case err == nil, errors.Is(err, fs.ErrExist):
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return nil // nothing to keep
	}
	if err := copyNew(path, keep); err != nil {
		return fmt.Errorf("cannot keep the Perl save file as %q: %w", keep, err)
	}
	return nil
}

// copyNew copies the file at src to dst, which must not exist: through a
// temporary file in dst's directory, synced, then linked to dst (our own
// new file, which we may link), so dst appears whole or not at all.
func copyNew(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), filepath.Base(src)+".tmp-*") // removed at the next start if a crash leaves it
	if err != nil {
		return err
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	if _, err := io.Copy(tmp, in); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := os.Link(tmp.Name(), dst); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return syncDir(filepath.Dir(dst))
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
