package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// writeBenchSnapshot writes a snapshot of 100,000 known IPs and 900,000
// grey triplets, all fresh, and returns its path.
func writeBenchSnapshot(b *testing.B) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "state")
	s := &snapshotter{path: path, table: newTable(defaultShards, 2_000_000), policy: testPolicyFunc, now: time.Now}
	now := uint32(time.Now().Unix())
	for i := range uint32(100_000) {
		s.table.markKnown(ckey(i), now, testExpiry)
	}
	for i := range uint64(900_000) {
		s.table.observeTriplet(tkey(i), now, 300, 43200, testExpiry)
	}
	if _, err := s.save(); err != nil {
		b.Fatal(err)
	}
	return path
}

// BenchmarkSnapshotSave measures a durable save of 1M entries.
func BenchmarkSnapshotSave(b *testing.B) {
	path := writeBenchSnapshot(b)
	s := &snapshotter{path: path, table: newTable(defaultShards, 2_000_000), policy: testPolicyFunc, now: time.Now}
	if _, err := s.load(); err != nil {
		b.Fatal(err)
	}
	var st saveStats
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if st, err = s.save(); err != nil {
			b.Fatal(err)
		}
	}
	n := float64(st.known + st.grey)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/entry")
	b.ReportMetric(float64(st.bytes)/n, "bytes/entry")
}

// BenchmarkSnapshotLoad measures loading 1M entries into an empty table.
func BenchmarkSnapshotLoad(b *testing.B) {
	path := writeBenchSnapshot(b)
	b.ReportAllocs()
	var n int
	for b.Loop() {
		s := &snapshotter{path: path, table: newTable(defaultShards, 2_000_000), policy: testPolicyFunc, now: time.Now}
		st, err := s.load()
		if err != nil {
			b.Fatal(err)
		}
		n = st.known + st.grey
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/entry")
}

// BenchmarkReplyDelayDuringSave measures the reply delay a client sees
// while 1M-entry snapshots are written back to back: one request in flight,
// half of them new triplets. It reports percentiles of the delay.
func BenchmarkReplyDelayDuringSave(b *testing.B) {
	cfg := defaultConfig()
	cfg.StateFile = writeBenchSnapshot(b)
	saves := make(chan error, 1)
	td := startTestDaemon(b, settingsOf(b, cfg), time.Now, func(d *daemon) {
		d.stdout, d.stderr = discard{}, discard{}
		d.saveNow = make(chan struct{})
		d.onSave = func(_ saveStats, err error) { saves <- err }
	})
	d := td.daemon
	defer func() {
		td.stopDaemon()
		<-saves // the final save
		td.stop(b)
	}()
	conn, err := net.DialUDP("udp", nil, td.addr)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()

	saving, stopSaving := context.WithCancel(context.Background())
	savesDone := make(chan int)
	go func() {
		n := 0
		for saving.Err() == nil {
			d.saveNow <- struct{}{}
			if err := <-saves; err != nil {
				b.Error(err)
			}
			n++
		}
		savesDone <- n
	}()
	delays := make([]time.Duration, 0, b.N)
	buf := make([]byte, 16)
	datagrams := [][]byte{req("192.0.2.1", alice, bob), nil}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		datagram := datagrams[0]
		if i%2 == 1 {
			datagram = req("192.0.2.2", alice, "u"+time.Now().Format("150405.000000000")+"@x")
		}
		start := time.Now()
		conn.Write(datagram)
		conn.SetReadDeadline(start.Add(3 * time.Second))
		if _, err := conn.Read(buf); err != nil {
			b.Fatalf("request %d: %v", i, err)
		}
		delays = append(delays, time.Since(start))
	}
	b.StopTimer()
	stopSaving()
	nSaves := <-savesDone
	slices.Sort(delays)
	pct := func(p float64) float64 {
		return float64(delays[min(len(delays)-1, int(p*float64(len(delays))))].Microseconds())
	}
	b.ReportMetric(pct(0.5), "p50-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
	b.ReportMetric(pct(0.999), "p99.9-µs")
	b.ReportMetric(float64(delays[len(delays)-1].Microseconds()), "max-µs")
	b.ReportMetric(float64(nSaves), "saves")
	os.Remove(cfg.StateFile)
}

// BenchmarkStartup measures the time from starting a daemon whose state
// file holds 1M entries to its first answered request.
func BenchmarkStartup(b *testing.B) {
	path := writeBenchSnapshot(b)
	buf := make([]byte, 16)
	for b.Loop() {
		cfg := defaultConfig()
		cfg.StateFile = path
		td := startTestDaemon(b, settingsOf(b, cfg), time.Now, func(d *daemon) { d.stdout, d.stderr = discard{}, discard{} })
		conn, err := net.DialUDP("udp", nil, td.addr)
		if err != nil {
			b.Fatal(err)
		}
		conn.Write(req("192.0.2.1", alice, bob))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Read(buf); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		conn.Close()
		td.stop(b)
		b.StartTimer()
	}
}
