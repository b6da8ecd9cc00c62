package main

import (
	"bytes"
	"net"
	"testing"
	"time"
)

// TestGeneratorMix checks that the generator's datagrams are well-formed
// requests and follow the mix: new triplets are unique, known-IP requests
// come from the known IPs.
func TestGeneratorMix(t *testing.T) {
	g := newGenerator(1, 42, 50, 30, 10)
	seen := map[string]int{}
	known := 0
	for range 1000 {
		d := g.next()
		fields := bytes.Split(bytes.TrimSuffix(d, []byte{0}), []byte{0})
		if len(fields) != 3 || fields[0][0] != 'I' || fields[1][0] != 'F' || fields[2][0] != 'T' {
			t.Fatalf("malformed datagram %q", d)
		}
		if bytes.HasPrefix(fields[0], []byte("I10.200.")) {
			known++
		}
		seen[string(d)]++
	}
	if known != 200 {
		t.Errorf("%d known-IP requests in 1000, want 200", known)
	}
	if len(seen) < 500 || len(seen) > 800 {
		t.Errorf("%d distinct requests in 1000: the mix is off", len(seen))
	}
}

// TestLoadAgainstNullResponder runs a short load against an in-process
// null responder: every request is answered and timed, none is lost.
func TestLoadAgainstNullResponder(t *testing.T) {
	for _, batch := range []int{0, 8} {
		conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { serveNull(conn, 2, batch); close(done) }()
		client, err := net.DialUDP("udp", nil, conn.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		var st stats
		loadSocket(client, &st, 0, 1, 4, time.Now().Add(200*time.Millisecond), 0, 50, 30, 10)
		client.Close()
		conn.Close()
		<-done
		if st.sent == 0 || st.received != st.sent || st.lost != 0 || len(st.latencies) != int(st.received) {
			t.Errorf("batch %d: sent %d, received %d, lost %d, %d latencies", batch, st.sent, st.received, st.lost, len(st.latencies))
		}
	}
}
