package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// lockStateFile takes the lock that makes a state file one daemon's: an
// exclusive flock(2) on path+".lock", which holds the daemon's process ID.
// The kernel releases the lock when the process ends however it ends, so a
// crash leaves no stale lock behind. A second daemon on the same state file
// gets an error naming the file and the process that holds it.
func lockStateFile(path string) (*os.File, error) {
	name := path + ".lock"
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	writable := err == nil
	if errors.Is(err, fs.ErrPermission) {
		// Left by a run as another user; a read-only descriptor locks
		// just as well.
		f, err = os.Open(name)
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open lock file %q for state file %q: %w", name, path, err)
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
