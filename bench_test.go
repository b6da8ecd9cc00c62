package main

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/d--j/go-milter"
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
// tables of 1M and 10M entries, beside the same shards with Go maps (the
// table before fpMap), a map guarded by one Mutex and a sync.Map. Keys are drawn in a scattered order, so most lookups miss the
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
		b.Run(fmt.Sprintf("sharded-gomap/%dM", n>>20), func(b *testing.B) {
			// The table as it was before fpMap: the same shards and
			// locks, each with a Go map.
			type mapShard struct {
				mu sync.RWMutex
				m  map[tripletKey]uint32
				_  [64]byte
			}
			shards := make([]mapShard, defaultShards)
			for i := range shards {
				shards[i].m = map[tripletKey]uint32{}
			}
			for i := range n {
				k := tkey(i)
				shards[k.shardHash()%defaultShards].m[k] = 1_000_000
			}
			var seed atomic.Uint64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := seed.Add(1) * 7919
				for pb.Next() {
					i++
					k := tkey(i % n)
					s := &shards[k.shardHash()%defaultShards]
					s.mu.RLock()
					t, ok := s.m[k]
					s.mu.RUnlock()
					if ok && 1_000_400-t < 43200 {
						continue
					}
					s.mu.Lock()
					s.m[k] = 1_000_400
					s.mu.Unlock()
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

// BenchmarkShardStall measures how long a shard's lock is held in the worst
// cases, on a shard of 8192 entries (shardsFor keeps shards at about that
// size): the slowest insert that starts a growth of the map or moves a step
// of one, an insert into the full shard (an eviction scans it), and a sweep
// that finds half of it expired. Each is
// the median over the iterations, in µs: a single run's maximum measures
// the machine's scheduling and interrupts more than the table.
func BenchmarkShardStall(b *testing.B) {
	const per = 8192
	var growth, evict, sweep []time.Duration
	for i := range b.N {
		tb := newTable(1, per)
		s := &tb.shards[0]
		base := uint64(i) << 32
		var worst time.Duration // the slowest insert that started or moved a growth
		for j := range uint64(per) {
			growing := s.grey.slots() != 0 && len(s.grey.old.groups) > 0
			slots := s.grey.slots()
			t0 := time.Now()
			tb.observeTriplet(tkey(base+j), 1_000_000+uint32(j%2)*50_000, 300, 43200, testExpiry)
			if d := time.Since(t0); growing || s.grey.slots() != slots {
				worst = max(worst, d)
			}
		}
		growth = append(growth, worst)
		t0 := time.Now()
		tb.observeTriplet(tkey(base+per), 1_050_000, 300, 43200, testExpiry)
		evict = append(evict, time.Since(t0))
		for j := range uint64(per) { // refill what the eviction freed
			tb.observeTriplet(tkey(base+2*per+j), 1_050_000, 300, 43200, testExpiry)
		}
		t0 = time.Now()
		tb.sweepShard(0, 1_000_000+43200+61, testExpiry)
		sweep = append(sweep, time.Since(t0))
	}
	median := func(d []time.Duration) float64 {
		slices.Sort(d)
		return float64(d[len(d)/2].Nanoseconds()) / 1000
	}
	b.ReportMetric(median(growth), "growth-µs")
	b.ReportMetric(median(evict), "evict-µs")
	b.ReportMetric(median(sweep), "sweep-µs")
}

// BenchmarkDecisionLog measures what logging one decision line costs the
// goroutine that decided, from all cores at once: the queue's critical
// section and the writer's wake-up (its writes, to a pipe that a reader
// drains, are on its own goroutine). "stuck" is the same with a reader that
// never reads: lines are dropped and counted, as fast.
func BenchmarkDecisionLog(b *testing.B) {
	line := appendLogLine(nil, netip.MustParseAddrPort("192.0.2.1:25"), "new grey",
		[]byte("I192.0.2.1\x00Falice@sender.example\x00Tbob@rcpt.example\x00"))
	for _, name := range []string{"pipe", "stuck"} {
		b.Run(name, func(b *testing.B) {
			r, w, err := os.Pipe()
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			defer w.Close()
			if name == "pipe" {
				go io.Copy(io.Discard, r)
			}
			l := newDecisionLog(newLossySink(w, "stdout"))
			b.ReportAllocs()
			b.SetBytes(int64(len(line)))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					l.write(line)
				}
			})
			b.StopTimer()
			l.flush()
			b.ReportMetric(float64(l.sink.lost.Load())/float64(b.N), "lost/op")
		})
	}
}

// BenchmarkMilterConversation measures one milter conversation (a
// connection, the negotiation, connect, HELO, MAIL, one RCPT, abort and
// quit) through the library's client, 16 at once, against greydaemon's
// milter and a null milter (the same library's NoOpMilter, answering
// continue to every event) in the same run. Half the conversations bring
// a new triplet; the rest repeat one.
func BenchmarkMilterConversation(b *testing.B) {
	run := func(b *testing.B, addr string) {
		client := milter.NewClient("tcp", addr, milter.WithActions(milter.OptAddHeader))
		var seed atomic.Uint64
		b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
		b.ReportAllocs()
		b.ResetTimer()
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			c := seed.Add(1)
			for i := 0; pb.Next(); i++ {
				ip := fmt.Sprintf("10.%d.%d.1", c, i%2*i%200)
				if err := benchConversation(client, ip, fmt.Sprintf("r%d@rcpt.example", i%2*i)); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "conversations/s")
	}
	b.Run("greydaemon", func(b *testing.B) {
		cfg := defaultConfig()
		cfg.StateFile = b.TempDir() + "/state"
		cfg.MilterListen = "127.0.0.1:0"
		td := startTestDaemon(b, settingsOf(b, cfg), time.Now, func(d *daemon) { d.stdout, d.stderr = discard{}, discard{} })
		defer td.stop(b)
		run(b, td.addrs["milter"].String())
	})
	b.Run("null-milter", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		server := milter.NewServer(milter.WithMilter(func() milter.Milter { return milter.NoOpMilter{} }))
		go server.Serve(ln)
		defer server.Close()
		run(b, ln.Addr().String())
	})
}

// benchConversation holds one milter conversation with one recipient.
func benchConversation(client *milter.Client, ip, rcpt string) error {
	s, err := client.Session(nil)
	if err != nil {
		return err
	}
	defer s.Close()
	if _, err := s.Conn("client.example", milter.FamilyInet, 4025, ip); err != nil {
		return err
	}
	if _, err := s.Helo("client.example"); err != nil {
		return err
	}
	if _, err := s.Mail("load@sender.example", ""); err != nil {
		return err
	}
	if _, err := s.Rcpt(rcpt, ""); err != nil {
		return err
	}
	if err := s.Abort(nil); err != nil {
		return err
	}
	return s.Close()
}
