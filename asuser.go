package main

import (
	"fmt"
	"os"
	"os/user"
	"runtime"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file is how the daemon touches files before it drops privileges.
// Started as root with -u, it creates its lock file and its unix sockets in
// directories the -u user may write, so that user could swap a name for a
// symlink at any moment. Root therefore does nothing there by path: each
// such operation runs on a thread whose file-system identity (fsuid, fsgid
// and groups, which the kernel keeps per thread) is the user's, so it can
// reach only what the user could reach anyway, and the files it creates
// belong to the user, with their group and mode set by the creation itself,
// not by a later chown or chmod of a name. The thread gets root's identity
// back before it serves anything else.

// A fileOwner is who a file is created as: a user, and the group the file
// gets.
type fileOwner struct {
	name string // the user's name, for errors
	uid  int
	gid  int // the user's primary group
	// fileGID is the group new files get: gid, or a socket group.
	fileGID int
}

// lookupOwner returns the fileOwner for the user called name, whose files
// get its primary group.
func lookupOwner(name string) (*fileOwner, error) {
	uid, gid, err := userIDs(name)
	if err != nil {
		return nil, err
	}
	if uid == 0 {
		return nil, fmt.Errorf("user %q is root (uid 0); -u must name an unprivileged user", name)
	}
	return &fileOwner{name: name, uid: uid, gid: gid, fileGID: gid}, nil
}

// withGroup returns a copy of o whose files get the group gid.
func (o *fileOwner) withGroup(gid int) *fileOwner {
	c := *o
	c.fileGID = gid
	return &c
}

// groupID returns the ID of the named group.
func groupID(name string) (int, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("cannot find group %q: %w", name, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, fmt.Errorf("group %q: bad gid %q", name, g.Gid)
	}
	return gid, nil
}

// umaskMu serialises changes of the process's file-creation mask.
var umaskMu sync.Mutex

// asOwner runs f with the file-creation mask umask (the process's, for
// the time f runs: the daemon creates no other files meanwhile) and, when
// owner is not nil, on a thread whose file-system identity is owner's: its
// uid, its file group (so that files f creates get it), and the user's
// primary group as the only supplementary one. The rest of the process
// keeps its identity.
func asOwner(owner *fileOwner, umask int, f func() error) error {
	umaskMu.Lock()
	old := unix.Umask(umask)
	defer func() { unix.Umask(old); umaskMu.Unlock() }()
	if owner == nil {
		return f()
	}
	runtime.LockOSThread()
	restore, err := becomeOnThisThread(owner)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := f()
	if err := restore(); err != nil {
		// The thread keeps the user's identity: let it end with the
		// process, which stops here.
		return fmt.Errorf("cannot take back root's identity after acting as user %q: %w", owner.name, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// becomeOnThisThread gives the calling thread, and no other, owner's
// file-system identity, and returns the function that gives it back. The
// raw system calls act on one thread; the wrappers in syscall and
// x/sys/unix would apply them to every thread of the process.
func becomeOnThisThread(owner *fileOwner) (restore func() error, err error) {
	saved, err := unix.Getgroups()
	if err != nil {
		return nil, fmt.Errorf("cannot read the process's groups: %w", err)
	}
	oldGID, _ := unix.SetfsgidRetGid(-1)
	oldUID, _ := unix.SetfsuidRetUid(-1)
	restore = func() error {
		unix.SetfsuidRetUid(oldUID)
		unix.SetfsgidRetGid(oldGID)
		if err := setThreadGroups(saved); err != nil {
			return err
		}
		if uid, _ := unix.SetfsuidRetUid(-1); uid != oldUID {
			return fmt.Errorf("fsuid is %d, not %d", uid, oldUID)
		}
		return nil
	}
	if err := setThreadGroups([]int{owner.gid}); err != nil {
		return nil, fmt.Errorf("cannot take user %q's groups: %w", owner.name, err)
	}
	unix.SetfsgidRetGid(owner.fileGID)
	unix.SetfsuidRetUid(owner.uid)
	gid, _ := unix.SetfsgidRetGid(-1)
	uid, _ := unix.SetfsuidRetUid(-1)
	if gid != owner.fileGID || uid != owner.uid {
		restore()
		return nil, fmt.Errorf("cannot act as user %q, group %d (fsuid %d, fsgid %d)", owner.name, owner.fileGID, uid, gid)
	}
	return restore, nil
}

// setThreadGroups sets the calling thread's supplementary groups.
func setThreadGroups(gids []int) error {
	list := make([]uint32, len(gids)+1) // never empty, for the pointer
	for i, g := range gids {
		list[i] = uint32(g)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(gids)), uintptr(unsafe.Pointer(&list[0])), 0); e != 0 {
		return e
	}
	return nil
}

// fileOwnerFor returns who the daemon creates its files as before it drops
// privileges: the -u user when it runs as root and user is set, else nil
// (itself). A user that is root, or that does not exist, is an error.
func fileOwnerFor(user string) (*fileOwner, error) {
	if user == "" {
		return nil, nil
	}
	if os.Geteuid() != 0 {
		return nil, nil // dropPrivileges says what is wrong
	}
	return lookupOwner(user)
}
