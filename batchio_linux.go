//go:build linux

package main

import (
	"encoding/binary"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A batchConn reads and writes many datagrams per system call with
// recvmmsg(2) and sendmmsg(2) on a UDP socket, without allocating.
//
// golang.org/x/net's ipv4.PacketConn.ReadBatch does the same but allocates a
// net.UDPAddr for every datagram it reads, which breaks greydaemon's
// zero-allocation path; this file is the small part of it we need, on the
// Go runtime's poller through syscall.RawConn.
//
// A batchConn is owned by one goroutine. Its buffers are reused: a datagram
// returned by datagram is valid until the next read.
type batchConn struct {
	rc syscall.RawConn

	recv  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // each peer's address, as the kernel wrote it
	bufs  [][]byte

	send     []unix.Mmsghdr
	sendIovs []unix.Iovec
	replies  [][2]byte
	nSend    int

	// Results of the last system call, set by readFn and writeFn, which
	// are made once so that passing them to RawConn does not allocate.
	n       int
	errno   syscall.Errno
	sendOff int
	readFn  func(fd uintptr) bool
	writeFn func(fd uintptr) bool
}

// newBatchConn returns a batchConn for conn that handles up to size
// datagrams per call, each up to bufSize bytes.
func newBatchConn(conn *net.UDPConn, size, bufSize int) (*batchConn, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	b := &batchConn{
		rc:       rc,
		recv:     make([]unix.Mmsghdr, size),
		iovs:     make([]unix.Iovec, size),
		names:    make([]unix.RawSockaddrInet6, size),
		bufs:     make([][]byte, size),
		send:     make([]unix.Mmsghdr, size),
		sendIovs: make([]unix.Iovec, size),
		replies:  make([][2]byte, size),
	}
	for i := range size {
		b.bufs[i] = make([]byte, bufSize)
		b.iovs[i].Base = &b.bufs[i][0]
		b.iovs[i].SetLen(bufSize)
		b.recv[i].Hdr.Iov = &b.iovs[i]
		b.recv[i].Hdr.SetIovlen(1)
		b.recv[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		b.sendIovs[i].Base = &b.replies[i][0]
		b.sendIovs[i].SetLen(2)
		b.send[i].Hdr.Iov = &b.sendIovs[i]
		b.send[i].Hdr.SetIovlen(1)
	}
	b.readFn = b.recvmmsg
	b.writeFn = b.sendmmsg
	return b, nil
}

func (b *batchConn) recvmmsg(fd uintptr) bool {
	for i := range b.recv {
		b.recv[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		b.recv[i].Hdr.Flags = 0
		b.recv[i].Len = 0
	}
	n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.recv[0])),
		uintptr(len(b.recv)), unix.MSG_DONTWAIT, 0, 0)
	if errno == unix.EAGAIN || errno == unix.EINTR {
		return false // wait until the socket is readable
	}
	b.n, b.errno = int(n), errno
	return true
}

// read waits for at least one datagram and reads as many as are queued, up
// to the batch size. It returns how many it read.
func (b *batchConn) read() (int, error) {
	b.n, b.errno = 0, 0
	if err := b.rc.Read(b.readFn); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	b.nSend = 0
	return b.n, nil
}

// datagram returns the i'th datagram of the last read. A datagram longer
// than the buffer comes back with the buffer's length and truncated set.
func (b *batchConn) datagram(i int) (d []byte, truncated bool) {
	h := &b.recv[i]
	return b.bufs[i][:h.Len], h.Hdr.Flags&unix.MSG_TRUNC != 0
}

// peer returns the source address of the i'th datagram of the last read.
func (b *batchConn) peer(i int) netip.AddrPort {
	sa := &b.names[i]
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}

// queueReply queues a 2-byte reply to the sender of the i'th datagram.
func (b *batchConn) queueReply(i int, reply []byte) {
	j := b.nSend
	copy(b.replies[j][:], reply)
	b.send[j].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
	b.send[j].Hdr.Namelen = b.recv[i].Hdr.Namelen
	b.nSend++
}

func (b *batchConn) sendmmsg(fd uintptr) bool {
	msgs := b.send[b.sendOff:b.nSend]
	n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&msgs[0])),
		uintptr(len(msgs)), unix.MSG_DONTWAIT, 0, 0)
	if errno == unix.EAGAIN || errno == unix.EINTR {
		return false // wait until the socket is writable
	}
	b.n, b.errno = int(n), errno
	return true
}

// flush sends the queued replies and returns how many were sent and how
// many failed. A reply that the kernel refuses is dropped; the others are
// still sent.
func (b *batchConn) flush() (sent, failed int, err error) {
	for b.sendOff = 0; b.sendOff < b.nSend; {
		b.n, b.errno = 0, 0
		if err := b.rc.Write(b.writeFn); err != nil {
			return sent, failed + b.nSend - b.sendOff, err
		}
		if b.errno != 0 {
			failed++
			b.sendOff++ // skip the reply the kernel refused
			err = b.errno
			continue
		}
		sent += b.n
		b.sendOff += b.n
	}
	b.nSend = 0
	return sent, failed, err
}
