package main

import (
	"fmt"
	"os/user"
	"strconv"
	"syscall"
)

// dropPrivileges switches the process to the named user: its uid, its
// primary group, and no supplementary groups. Go applies each of these
// calls to every thread of the process. It refuses a user with uid 0, since
// that would keep root.
func dropPrivileges(name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		return fmt.Errorf("cannot switch to user %q: %w", name, err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return fmt.Errorf("cannot switch to user %q: bad uid %q", name, u.Uid)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return fmt.Errorf("cannot switch to user %q: bad gid %q", name, u.Gid)
	}
	if uid == 0 {
		return fmt.Errorf("cannot switch to user %q: it is root (uid 0); -u must name an unprivileged user", name)
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
