package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"
)

// socketBuffer is the receive buffer asked for on each socket, so that a
// burst of requests waits in the kernel rather than being dropped. Linux
// caps it at net.core.rmem_max.
const socketBuffer = 4 << 20

// socketCount returns how many sockets to bind to the listen address: one
// per core (at most 8), which measured about 15% faster than one shared
// socket on two cores, since readers then do not queue on one socket's
// locks. GREYDAEMON_SOCKETS overrides it, for measurements.
func socketCount() int {
	if n, err := strconv.Atoi(os.Getenv("GREYDAEMON_SOCKETS")); err == nil && n > 0 && n <= 64 {
		return n
	}
	return min(max(runtime.GOMAXPROCS(0), 1), 8)
}

// readersPerSocket returns how many reader goroutines serve each of n
// sockets: enough that every core has one, and with one socket per core,
// one. Two readers on one socket queue on its read lock (the Go runtime
// holds it while a reader waits for data), which gained nothing in
// throughput or in reply delay during saves, and made the runtime allocate
// wait-queue entries. When decisions go to a shared store (remote), each
// reader waits for a round trip per batch, so there are
// redisReadersPerSocket, enough that the waits overlap. GREYDAEMON_READERS
// overrides it, for measurements.
func readersPerSocket(n int, remote bool) int {
	if r, err := strconv.Atoi(os.Getenv("GREYDAEMON_READERS")); err == nil && r > 0 && r <= 64 {
		return r
	}
	r := max(1, (runtime.GOMAXPROCS(0)+n-1)/n)
	if remote {
		r = max(r, redisReadersPerSocket)
	}
	return r
}

// redisReadersPerSocket is how many readers serve each socket when
// decisions go to Redis.
const redisReadersPerSocket = 4

// listenUDP binds n UDP sockets to addr; with n > 1 they share it through
// SO_REUSEPORT, and the kernel spreads clients over them.
func listenUDP(addr *net.UDPAddr, n int) ([]*net.UDPConn, error) {
	if n <= 1 {
		conn, err := net.ListenUDP("udp", addr)
		if err != nil {
			return nil, err
		}
		return []*net.UDPConn{conn}, nil
	}
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var sockErr error
		err := c.Control(func(fd uintptr) {
			sockErr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		if err != nil {
			return err
		}
		return sockErr
	}}
	var conns []*net.UDPConn
	bind := addr.String()
	for range n {
		pc, err := lc.ListenPacket(context.Background(), "udp", bind)
		if err != nil {
			closeAll(conns)
			return nil, fmt.Errorf("SO_REUSEPORT socket: %w", err)
		}
		conn := pc.(*net.UDPConn)
		conns = append(conns, conn)
		bind = conn.LocalAddr().String() // port 0 becomes the port the first socket got
	}
	return conns, nil
}

// openQmailSockets returns the qmail front end's sockets: the UDP sockets
// the service manager passed (systemd socket activation, reported as
// activated), or new ones bound to hostport. It refuses an address that
// another process has bound already: with SO_REUSEPORT the kernel would
// otherwise let a second daemon share the port and spread the queries over
// two tables.
func openQmailSockets(hostport string, passed *passedSockets) (conns []*net.UDPConn, activated bool, err error) {
	if len(passed.udp) > 0 {
		conns, passed.udp = passed.udp, nil
		return conns, true, nil
	}
	laddr, err := net.ResolveUDPAddr("udp", hostport)
	if err != nil {
		return nil, false, fmt.Errorf("cannot resolve listen address %q: %w", hostport, err)
	}
	if err := checkAddressFree(laddr); err != nil {
		return nil, false, err
	}
	conns, err = listenUDP(laddr, socketCount())
	if err != nil {
		return nil, false, fmt.Errorf("cannot listen on %s: %w", hostport, err)
	}
	return conns, false, nil
}

// passedSockets are the sockets the service manager passed (systemd socket
// activation, LISTEN_FDS): UDP ones for qmail, and listening unix stream
// ones, which the front end configured with the same path takes.
type passedSockets struct {
	udp     []*net.UDPConn
	streams []*net.UnixListener
}

// takePassedSockets returns the sockets the service manager passed, none
// when it passed none.
func takePassedSockets() (*passedSockets, error) {
	p := &passedSockets{}
	if os.Getenv("LISTEN_FDS") == "" {
		return p, nil
	}
	for _, f := range activation.Files(true) {
		if ln, err := net.FileListener(f); err == nil {
			f.Close()
			ul, ok := ln.(*net.UnixListener)
			if !ok {
				ln.Close()
				p.closeAll()
				return nil, fmt.Errorf("the service manager passed a %s stream socket (%s); greydaemon takes unix stream sockets only (ListenStream=/path)", ln.Addr().Network(), ln.Addr())
			}
			ul.SetUnlinkOnClose(false) // the service manager's file
			p.streams = append(p.streams, ul)
			continue
		}
		pc, err := net.FilePacketConn(f)
		f.Close()
		if err != nil {
			p.closeAll()
			return nil, fmt.Errorf("cannot use a socket passed by the service manager: %w", err)
		}
		conn, ok := pc.(*net.UDPConn)
		if !ok {
			pc.Close()
			p.closeAll()
			return nil, fmt.Errorf("the service manager passed a %s socket; greydaemon needs UDP (ListenDatagram=)", pc.LocalAddr().Network())
		}
		p.udp = append(p.udp, conn)
	}
	return p, nil
}

// takeUnix returns the passed unix listener bound to path, or nil.
func (p *passedSockets) takeUnix(path string) *net.UnixListener {
	for i, ln := range p.streams {
		if ln.Addr().String() == path {
			p.streams = append(p.streams[:i], p.streams[i+1:]...)
			return ln
		}
	}
	return nil
}

// closeAll closes every socket not taken.
func (p *passedSockets) closeAll() {
	closeAll(p.udp)
	for _, ln := range p.streams {
		ln.Close()
	}
	p.udp, p.streams = nil, nil
}

// checkAddressFree returns an error naming the address, and the process
// where it can, when another socket is bound to addr. It binds addr once
// without SO_REUSEPORT, which fails while any other socket holds it.
func checkAddressFree(addr *net.UDPAddr) error {
	if addr.Port == 0 {
		return nil // the kernel picks a free port
	}
	probe, err := net.ListenUDP("udp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("cannot listen on %s: the address is in use by another process%s; is another greydaemon running?",
				addr, udpOwner(addr))
		}
		return fmt.Errorf("cannot listen on %s: %w", addr, err)
	}
	probe.Close()
	return nil
}

// udpOwner returns " (pid N, NAME)" for a process that has a UDP socket
// bound to addr's port, or "" when it cannot tell (not Linux, or the
// process belongs to another user).
func udpOwner(addr *net.UDPAddr) string {
	inodes := map[string]bool{}
	port := fmt.Sprintf(":%04X", addr.Port)
	for _, table := range []string{"/proc/net/udp", "/proc/net/udp6"} {
		data, err := os.ReadFile(table)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) > 9 && strings.HasSuffix(f[1], port) {
				inodes["socket:["+f[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return ""
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		for _, fd := range fds {
			link, _ := os.Readlink(filepath.Join("/proc", p.Name(), "fd", fd.Name()))
			if inodes[link] {
				comm, _ := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
				return fmt.Sprintf(" (pid %d, %s)", pid, strings.TrimSpace(string(comm)))
			}
		}
	}
	return ""
}

// closeAll closes every socket.
func closeAll(conns []*net.UDPConn) {
	for _, c := range conns {
		c.Close()
	}
}

// listenUnix binds a unix stream socket at path, for purpose (which error
// messages name). The socket file is created with its mode, owner and
// group from the start (see asOwner): as owner (nil: as the process) and
// with the group gid unless it is -1. A socket file left by an earlier run
// is replaced when nothing listens on it; anything else at path is an
// error. Closing the listener leaves the file: the server removes it once
// its connections are done.
func listenUnix(path string, mode os.FileMode, owner *fileOwner, gid int, purpose string) (*net.UnixListener, error) {
	if owner != nil && gid >= 0 {
		owner = owner.withGroup(gid)
	}
	var ln *net.UnixListener
	err := asOwner(owner, int(0o777&^mode.Perm()), func() error {
		if err := removeStaleSocket(path); err != nil {
			return err
		}
		var err error
		if ln, err = bindUnix(path); err != nil {
			return err
		}
		if owner == nil && gid >= 0 {
			// Not root: the group of a file of our own, never through
			// a symlink.
			if err := unix.Fchownat(unix.AT_FDCWD, path, -1, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				ln.Close()
				os.Remove(path)
				return fmt.Errorf("cannot give it to group %d (greydaemon must run as root or as a member of the group): %w", gid, err)
			}
		}
		return nil
	})
	if err != nil {
		as := ""
		if owner != nil {
			as = fmt.Sprintf(" (it is created as user %q, who must be able to write its directory)", owner.name)
		}
		return nil, fmt.Errorf("cannot listen on %q for %s%s: %w", path, purpose, as, err)
	}
	return ln, nil
}

// removeStaleSocket removes a socket file at path that nothing listens on.
// Anything else at path is an error.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return errors.New("it exists and is not a socket")
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return errors.New("another process is listening on it")
	}
	os.Remove(path) // left by an earlier run
	return nil
}

// bindUnix creates a listening unix stream socket at path on the calling
// thread (whose credentials and mask then give the file its owner, group
// and mode).
func bindUnix(path string) (*net.UnixListener, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close() // FileListener holds a duplicate
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return nil, err
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		os.Remove(path)
		return nil, err
	}
	l, err := net.FileListener(f)
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	ln := l.(*net.UnixListener)
	ln.SetUnlinkOnClose(false)
	return ln, nil
}
