//go:build !linux

package main

import (
	"errors"
	"net"
	"net/netip"
)

// batchConn is only implemented on Linux; elsewhere the server reads one
// datagram per system call.
type batchConn struct{}

func newBatchConn(*net.UDPConn, int, int) (*batchConn, error) {
	return nil, errors.New("batched UDP I/O needs Linux")
}

func (*batchConn) read() (int, error)                   { return 0, errors.ErrUnsupported }
func (*batchConn) datagram(int) ([]byte, bool)          { return nil, false }
func (*batchConn) peer(int) netip.AddrPort              { return netip.AddrPort{} }
func (*batchConn) queueReply(int, []byte)               {}
func (*batchConn) flush() (sent, failed int, err error) { return 0, 0, nil }
