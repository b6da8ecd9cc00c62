package main

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// userIDs returns the uid and primary gid of the named user.
func userIDs(name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, fmt.Errorf("cannot find user %q: %w", name, err)
	}
	if uid, err = strconv.Atoi(u.Uid); err != nil {
		return 0, 0, fmt.Errorf("user %q: bad uid %q", name, u.Uid)
	}
	if gid, err = strconv.Atoi(u.Gid); err != nil {
		return 0, 0, fmt.Errorf("user %q: bad gid %q", name, u.Gid)
	}
	return uid, gid, nil
}

// dropPrivileges switches the process to the named user: its uid, its
// primary group, and no supplementary groups. Go applies each of these
// calls to every thread of the process. It refuses a user with uid 0, since
// that would keep root.
func dropPrivileges(name string) error {
	uid, gid, err := userIDs(name)
	if err != nil {
		return fmt.Errorf("cannot switch to user %q: %w", name, err)
	}
	if uid == 0 {
		return fmt.Errorf("cannot switch to user %q: it is root (uid 0); -u must name an unprivileged user", name)
	}
	if euid := os.Geteuid(); euid != 0 {
		if euid == uid {
			return nil // already that user, as under a service manager's User=
		}
		return fmt.Errorf("cannot switch to user %q: greydaemon already runs as uid %d, and only root can switch; remove user (-u) or start it as root", name, euid)
	}
	if err := syscall.Setgroups([]int{}); err != nil {
		return fmt.Errorf("cannot drop supplementary groups: %w", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("cannot switch to group %d: %w", gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("cannot switch to user %q (uid %d): %w", name, uid, err)
	}
	// Setuid as root sets the real, effective and saved uid: check that
	// root cannot be regained.
	if syscall.Setuid(0) == nil {
		return fmt.Errorf("switched to user %q but could regain root", name)
	}
	return nil
}
