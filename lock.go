package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// lockStateFile takes the lock that makes a state file one daemon's: an
// exclusive flock(2) on path+".lock", which holds the daemon's process ID.
// The kernel releases the lock when the process ends however it ends, so a
// crash leaves no stale lock behind. A second daemon on the same state file
// gets an error naming the file and the process that holds it.
//
// The lock file lives in the state directory, which the -u user may write:
// it is opened as owner (see asOwner; nil: as the process), never through a
// symlink, and only if it is a regular file with no other names, so that
// nobody can point the daemon at another file to truncate.
func lockStateFile(path string, owner *fileOwner) (*os.File, error) {
	name := path + ".lock"
	var f *os.File
	writable := true
	err := asOwner(owner, 0o022, func() error {
		const flags = os.O_CREATE | unix.O_NOFOLLOW | unix.O_NONBLOCK | unix.O_CLOEXEC
		var err error
		f, err = os.OpenFile(name, os.O_RDWR|flags, 0o644)
		if errors.Is(err, fs.ErrPermission) {
			// Left by a run as another user; a read-only descriptor
			// locks just as well.
			writable = false
			var rerr error
			if f, rerr = os.OpenFile(name, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); !errors.Is(rerr, fs.ErrNotExist) {
				err = rerr
			}
		}
		return err
	})
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("lock file %q for state file %q is a symlink; greydaemon does not follow one there: remove it", name, path)
	}
	if errors.Is(err, fs.ErrPermission) && owner != nil {
		dir := filepath.Dir(path)
		return nil, fmt.Errorf("cannot create files in %q, the directory of state file %q, as user %s (uid %d): %w; make it writable by that user (chown %s %q)",
			dir, path, owner.name, owner.uid, err, owner.name, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open lock file %q for state file %q: %w", name, path, err)
	}
	if err := checkLockFile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock file %q for state file %q %v; remove it", name, path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder := lockHolder(f)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state file %q is in use by another greydaemon%s (lock file %q); stop it first, or give this one another state file",
				path, holder, name)
		}
		return nil, fmt.Errorf("cannot lock %q: %w", name, err)
	}
	if writable {
		f.Truncate(0)
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// checkLockFile returns what is wrong with an open lock file: anything but
// a regular file with one name (a hard link could name another user's
// file), as a phrase that follows the file's name.
func checkLockFile(f *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("cannot be examined: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return errors.New("is not a regular file")
	}
	if st.Nlink != 1 {
		return fmt.Errorf("has %d names (hard links); greydaemon writes only to a lock file of its own", st.Nlink)
	}
	return nil
}

// lockHolder returns " (pid N)" with the process ID that a lock file
// holds, or "" if it holds none.
func lockHolder(f *os.File) string {
	buf := make([]byte, 32)
	n, _ := f.ReadAt(buf, 0)
	pid, err := strconv.Atoi(string(bytes.TrimSpace(buf[:n])))
	if err != nil || pid <= 0 {
		return ""
	}
	return fmt.Sprintf(" (pid %d)", pid)
}
