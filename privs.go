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

// chownToUser gives the file at path to the named user and its primary
// group.
func chownToUser(path, name string) error {
	uid, gid, err := userIDs(name)
	if err == nil {
		err = os.Chown(path, uid, gid)
	}
	if err != nil {
		return fmt.Errorf("cannot give %q to user %q: %w", path, name, err)
	}
	return nil
}

// chgrpTo gives the file at path to the named group. The daemon must run
// as root or be a member of the group.
func chgrpTo(path, group string) error {
	g, err := user.LookupGroup(group)
	if err != nil {
		return fmt.Errorf("cannot find group %q: %w", group, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return fmt.Errorf("group %q: bad gid %q", group, g.Gid)
	}
	if err := os.Chown(path, -1, gid); err != nil {
		return fmt.Errorf("cannot give %q to group %q (greydaemon must run as root or as a member of the group): %w", path, group, err)
	}
	return nil
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
