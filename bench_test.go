package main

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Run with:
//
//	go test -run '^$' -bench . -benchmem

func BenchmarkParseRequest(b *testing.B) {
	d := req("192.0.2.10", alice, bob, carol)
	b.ReportAllocs()
	b.SetBytes(int64(len(d)))
	for b.Loop() {
		r, err := parseRequest(d)
		if err != nil {
			b.Fatal(err)
		}
		_, fields, err := r.sender()
		if err != nil {
			b.Fatal(err)
		}
		for {
			_, rest, ok, err := nextRecipient(fields)
			if err != nil {
				b.Fatal(err)
			}
			if !ok {
				break
			}
			fields = rest
		}
	}
}

const benchEntries = 1 << 20

// fillTable returns a table holding n grey triplets made by tkey.
func fillTable(n int) *table {
	tb := newTable(defaultShards, 2*n)
	for i := range uint64(n) {
		tb.observeTriplet(tkey(i), 1_000_000, 300, 43200, testExpiry)
	}
	return tb
}

// BenchmarkTable measures a triplet lookup-and-update from all cores in
// tables of 1M and 10M entries, beside a map guarded by one Mutex and a
// sync.Map. Keys are drawn in a scattered order, so most lookups miss the
// CPU caches, as they do in a daemon serving many clients.
func BenchmarkTable(b *testing.B) {
	for _, n := range []uint64{1 << 20, 10 << 20} {
		b.Run(fmt.Sprintf("sharded/%dM", n>>20), func(b *testing.B) {
			tb := fillTable(int(n))
			var seed atomic.Uint64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := seed.Add(1) * 7919
				for pb.Next() {
					i++
					tb.observeTriplet(tkey(i%n), 1_000_400, 300, 43200, testExpiry)
				}
			})
		})
		b.Run(fmt.Sprintf("map+Mutex/%dM", n>>20), func(b *testing.B) {
			m := make(map[tripletKey]uint32, n)
			for i := range n {
				m[tkey(i)] = 1_000_000
			}
			var mu sync.Mutex
			var seed atomic.Uint64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := seed.Add(1) * 7919
				for pb.Next() {
					i++
					k := tkey(i % n)
					mu.Lock()
					if t, ok := m[k]; !ok || 1_000_400-t >= 43200 {
						m[k] = 1_000_400
					}
					mu.Unlock()
				}
			})
		})
	}
	b.Run("sync.Map/1M", func(b *testing.B) {
		var m sync.Map
		for i := range uint64(benchEntries) {
			m.Store(tkey(i), uint32(1_000_000))
		}
		var seed atomic.Uint64
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			i := seed.Add(1) * 7919
			for pb.Next() {
				i++
				k := tkey(i % benchEntries)
				if v, ok := m.Load(k); !ok || 1_000_400-v.(uint32) >= 43200 {
					m.Store(k, uint32(1_000_400))
				}
			}
		})
	})
}

// BenchmarkDecide measures whole decisions (parse, key, lookups) on all
// cores against a table of 1M triplets: half retries of held triplets, half
// new ones.
func BenchmarkDecide(b *testing.B) {
	clock := newFakeClock()
	g := NewGreylister(newTable(defaultShards, 4*benchEntries), testPolicy, nil, clock.now)
	var kb keyBuilder
	const pool = 4096
	held := make([][]byte, pool)
	for i := range benchEntries {
		d := req(fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255), alice, fmt.Sprintf("u%d@rcpt.example", i))
		if i < pool {
			held[i] = d
		}
		g.decideQmail(&kb, d)
	}
	clock.advance(time.Minute) // retries now are "too soon": nothing is added
	var seed atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var kb keyBuilder
		w := seed.Add(1)
		i := int(w) * 131
		fresh := []byte(fmt.Sprintf("I172.16.%d.1\x00Fnew@sender.example\x00Tnew00000000@rcpt.example\x00", w))
		digits := fresh[len(fresh)-len("00000000@rcpt.example\x00"):]
		for pb.Next() {
			i++
			if i%2 == 0 {
				g.decideQmail(&kb, held[i%pool])
				continue
			}
			for j, n := 0, i; j < 8; j, n = j+1, n>>4 {
				digits[j] = "0123456789abcdef"[n&15]
			}
			g.decideQmail(&kb, fresh)
		}
	})
}

// BenchmarkUDPRoundTrip measures one request and its reply through the
// loopback interface, one request in flight per client goroutine, beside a
// null responder that answers every datagram with two fixed bytes.
func BenchmarkUDPRoundTrip(b *testing.B) {
	run := func(b *testing.B, addr *net.UDPAddr) {
		var seed atomic.Uint64
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			conn, err := net.DialUDP("udp", nil, addr)
			if err != nil {
				b.Error(err)
				return
			}
			defer conn.Close()
			d := req(fmt.Sprintf("192.0.2.%d", seed.Add(1)), alice, bob)
			buf := make([]byte, 16)
			for pb.Next() {
				conn.Write(d)
				conn.SetReadDeadline(time.Now().Add(2 * time.Second))
				if _, err := conn.Read(buf); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.Run("greydaemon", func(b *testing.B) {
		cfg := defaultConfig()
		cfg.StateFile = b.TempDir() + "/state"
		addr, stop := startBenchDaemon(b, cfg)
		defer stop()
		run(b, addr)
	})
	b.Run("null-responder", func(b *testing.B) {
		conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		go func() {
			buf := make([]byte, maxRequestSize+1)
			reply := []byte{1, 3}
			for {
				_, peer, err := conn.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				conn.WriteToUDPAddrPort(reply, peer)
			}
		}()
		run(b, conn.LocalAddr().(*net.UDPAddr))
	})
}

// startBenchDaemon runs a daemon with logging to a discarding writer.
func startBenchDaemon(b *testing.B, cfg Config) (*net.UDPAddr, func()) {
	td := startTestDaemon(b, settingsOf(b, cfg), time.Now, func(d *daemon) { d.stdout, d.stderr = discard{}, discard{} })
	return td.addr, func() { td.stop(b) }
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
