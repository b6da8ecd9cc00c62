package main

import (
	"bytes"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func newTestSnapshotter(t testing.TB, path string, clock *fakeClock) *snapshotter {
	return &snapshotter{path: path, table: newTable(16, 1_000_000), policy: testPolicyFunc, now: clock.now}
}

// tableContents returns every entry of t, for comparison.
func tableContents(t *table) (map[clientKey]uint32, map[tripletKey]uint32) {
	known, grey := map[clientKey]uint32{}, map[tripletKey]uint32{}
	for i := range t.shards {
		k, g := t.appendShardRecords(i, nil, nil)
		for ; len(k) > 0; k = k[recordSize:] {
			key, v := parseRecord(k)
			known[key] = v
		}
		for ; len(g) > 0; g = g[recordSize:] {
			key, v := parseRecord(g)
			grey[key] = v
		}
	}
	return known, grey
}

func TestSnapshotRoundTrip(t *testing.T) {
	clock := newFakeClock()
	path := filepath.Join(t.TempDir(), "state")
	s := newTestSnapshotter(t, path, clock)
	now := uint32(clock.now().Unix())
	r := rand.New(rand.NewPCG(3, 4))
	for i := range uint32(3000) {
		s.table.markKnown(ckey(i), now-uint32(r.IntN(6*24*3600)), testExpiry)
	}
	for i := range uint64(20000) {
		s.table.observeTriplet(tkey(i), now-uint32(r.IntN(12*3600)), 300, 43200, testExpiry)
	}
	// Expired entries, which a load must drop.
	s.table.markKnown(ckey(999_999), now-8*24*3600, testExpiry)
	s.table.observeTriplet(tkey(999_999), now-13*3600, 300, 43200, testExpiry)
	st, err := s.save()
	if err != nil {
		t.Fatal(err)
	}
	if st.known != 3001 || st.grey != 20001 {
		t.Fatalf("saved %d known, %d grey", st.known, st.grey)
	}
	wantKnown, wantGrey := tableContents(s.table)
	delete(wantKnown, ckey(999_999))
	delete(wantGrey, tkey(999_999))

	s2 := newTestSnapshotter(t, path, clock)
	ls, err := s2.load()
	if err != nil {
		t.Fatal(err)
	}
	if ls.format != "msgpack" || ls.known != 3000 || ls.grey != 20000 || ls.expired != 2 {
		t.Fatalf("load stats %+v", ls)
	}
	gotKnown, gotGrey := tableContents(s2.table)
	if len(gotKnown) != len(wantKnown) || len(gotGrey) != len(wantGrey) {
		t.Fatalf("loaded %d/%d entries, want %d/%d", len(gotKnown), len(gotGrey), len(wantKnown), len(wantGrey))
	}
	for k, v := range wantKnown {
		if gotKnown[k] != v {
			t.Fatalf("known %v: got %d, want %d", k, gotKnown[k], v)
		}
	}
	for k, v := range wantGrey {
		if gotGrey[k] != v {
			t.Fatalf("grey %v: got %d, want %d", k, gotGrey[k], v)
		}
	}
	// No temporary files are left behind.
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("directory holds %d files, want only the snapshot", len(entries))
	}
}

func TestSnapshotMissingFile(t *testing.T) {
	s := newTestSnapshotter(t, filepath.Join(t.TempDir(), "none"), newFakeClock())
	st, err := s.load()
	if err != nil || st.format != "missing" {
		t.Fatalf("got %+v, %v", st, err)
	}
}

// TestSnapshotCorruption truncates a small snapshot at every offset and
// flips random bytes: every damaged file is refused with errCorrupt and
// nothing panics.
func TestSnapshotCorruption(t *testing.T) {
	clock := newFakeClock()
	path := filepath.Join(t.TempDir(), "state")
	s := newTestSnapshotter(t, path, clock)
	now := uint32(clock.now().Unix())
	for i := range uint32(20) {
		s.table.markKnown(ckey(i), now, testExpiry)
		s.table.observeTriplet(tkey(uint64(i)), now, 300, 43200, testExpiry)
	}
	if _, err := s.save(); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	add := func(int, [16]byte, uint32) bool { return true }
	for n := 1; n < len(good); n++ {
		if _, err := decodeSnapshot(good[:n], add, nil); !errors.Is(err, errCorrupt) {
			t.Fatalf("truncated to %d of %d bytes: got %v", n, len(good), err)
		}
	}
	r := rand.New(rand.NewPCG(5, 6))
	for range 2000 {
		bad := bytes.Clone(good)
		for range 1 + r.IntN(3) {
			bad[r.IntN(len(bad))] ^= byte(1 + r.IntN(255))
		}
		if _, err := decodeSnapshot(bad, add, nil); !errors.Is(err, errCorrupt) {
			t.Fatalf("flipped bytes: got %v", err)
		}
	}
}

// TestCorruptStateFileSetAside checks that the daemon sets a damaged state
// file aside, starts empty, and says so loudly.
func TestCorruptStateFileSetAside(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	damaged := append(bytes.Clone(snapshotPrefix), "\x01garbage"...)
	os.WriteFile(path, damaged, 0o600)
	cfg := defaultConfig()
	cfg.StateFile = path
	_, stop := startDaemon(t, cfg, clock.now)
	_, stderr := stop()
	if !strings.Contains(stderr, "greydaemon: error: state file is damaged") {
		t.Errorf("no loud error:\n%s", stderr)
	}
	aside := filepath.Join(dir, "state.corrupt-1700000000")
	if got, err := os.ReadFile(aside); err != nil || !bytes.Equal(got, damaged) {
		t.Fatalf("damaged file not kept as %s: %v", aside, err)
	}
	// The final save wrote a fresh, valid snapshot.
	s := newTestSnapshotter(t, path, clock)
	if st, err := s.load(); err != nil || st.format != "msgpack" {
		t.Fatalf("fresh snapshot: %+v, %v", st, err)
	}
}

const perlSave = `I 1699999000 192.0.2.1
I 1699999000 2001:db8::1
I 1000 192.0.2.99
G 1699999000 192.0.2.7 alice@sender.example bob@rcpt.example
G 1699999000 2001:db8::7 . list@rcpt.example
G 1000 192.0.2.8 old@sender.example bob@rcpt.example
this line is junk
G 1699999000 192.0.2.9 missing-recipient
`

// TestPerlSaveFileImport loads a Perl save file with IPv6 entries, an
// expired line and junk lines, and checks that the loaded state answers as
// the Perl daemon would.
func TestPerlSaveFileImport(t *testing.T) {
	clock := newFakeClock() // 1700000000
	path := filepath.Join(t.TempDir(), "state")
	os.WriteFile(path, []byte(perlSave), 0o600)
	s := newTestSnapshotter(t, path, clock)
	st, err := s.load()
	if err != nil {
		t.Fatal(err)
	}
	if st.format != "perl" || st.known != 2 || st.grey != 2 || st.expired != 2 || st.bad != 2 {
		t.Fatalf("load stats %+v", st)
	}
	g := NewGreylister(s.table, testPolicy, nil, clock.now)
	runSteps(t, g, clock, []step{
		{0, req("192.0.2.1", alice, bob), AcceptKnownIP, nil},
		{0, req("2001:DB8::1", alice, bob), AcceptKnownIP, nil},
		{0, req("192.0.2.99", alice, bob), GreyNew, nil},
		{0, req("192.0.2.7", "Alice@Sender.example", bob), AcceptRetried, nil},
		{0, req("2001:db8::7", "", "list@rcpt.example"), AcceptRetried, nil},
	})
	// The first save keeps the Perl file as state.perl.
	if _, err := s.save(); err != nil {
		t.Fatal(err)
	}
	if kept, err := os.ReadFile(path + ".perl"); err != nil || string(kept) != perlSave {
		t.Fatalf("Perl file not kept: %v", err)
	}
}

func TestNotASaveFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	os.WriteFile(path, []byte("\x89PNG\r\n\x1a\nnot a save file\n"), 0o600)
	s := newTestSnapshotter(t, path, newFakeClock())
	if _, err := s.load(); !errors.Is(err, errCorrupt) {
		t.Fatalf("got %v, want errCorrupt", err)
	}
}

// TestSaveFailureKeepsOldSnapshot saves into a directory that cannot be
// written: the save fails naming the path, and the old snapshot stays.
func TestSaveFailureKeepsOldSnapshot(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	s := newTestSnapshotter(t, path, clock)
	s.table.markKnown(ckey(1), uint32(clock.now().Unix()), testExpiry)
	if _, err := s.save(); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	s.path = filepath.Join(dir, "missing-dir", "state")
	if _, err := s.save(); err == nil || !strings.Contains(err.Error(), "missing-dir") {
		t.Fatalf("save into a missing directory: %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatal("old snapshot changed")
	}
}

func TestDump(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	perl := filepath.Join(dir, "perl")
	os.WriteFile(perl, []byte(perlSave), 0o600)
	var out bytes.Buffer
	if err := dumpFile(perl, &out); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 6 || lines[0] != "I 1699999000 192.0.2.1" || lines[1] != "I 1699999000 2001:db8::1" ||
		!strings.HasPrefix(lines[3], "G 1699999000 #") {
		t.Fatalf("dump:\n%s", out.String())
	}
	// The dump loads back into the same state.
	dumped := filepath.Join(dir, "dumped")
	os.WriteFile(dumped, out.Bytes(), 0o600)
	a := newTestSnapshotter(t, perl, clock)
	b := newTestSnapshotter(t, dumped, clock)
	if _, err := a.load(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.load(); err != nil {
		t.Fatal(err)
	}
	ak, ag := tableContents(a.table)
	bk, bg := tableContents(b.table)
	if len(ak) != len(bk) || len(ag) != len(bg) {
		t.Fatalf("dump round trip: %d/%d vs %d/%d", len(ak), len(ag), len(bk), len(bg))
	}
	for k, v := range ag {
		if bg[k] != v {
			t.Fatalf("grey entry %v lost in the dump", k)
		}
	}
	if err := dumpFile(filepath.Join(dir, "none"), &out); err == nil || !strings.Contains(err.Error(), "cannot read state file") || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("dump of a missing file: %v", err)
	}
}

func FuzzLoadSnapshot(f *testing.F) {
	clock := newFakeClock()
	s := newTestSnapshotter(f, filepath.Join(f.TempDir(), "state"), clock)
	s.table.markKnown(ckey(1), uint32(clock.now().Unix()), testExpiry)
	s.table.observeTriplet(tkey(1), uint32(clock.now().Unix()), 300, 43200, testExpiry)
	if _, err := s.save(); err != nil {
		f.Fatal(err)
	}
	good, _ := os.ReadFile(s.path)
	f.Add(good)
	f.Add([]byte(perlSave))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := decodeSnapshot(data, func(int, [16]byte, uint32) bool { return true }, nil)
		if err != nil && !errors.Is(err, errCorrupt) {
			t.Fatalf("error does not wrap errCorrupt: %v", err)
		}
	})
}

func FuzzPerlSave(f *testing.F) {
	f.Add([]byte(perlSave))
	f.Add([]byte("G 1 #0123456789abcdef0123456789abcdef\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		n := 0
		st, err := readPerlSave(bytes.NewReader(data), func(int, [16]byte, uint32) bool { n++; return true })
		if err != nil && !errors.Is(err, errCorrupt) {
			t.Fatalf("error does not wrap errCorrupt: %v", err)
		}
		if st.known+st.grey != n {
			t.Fatalf("counted %d+%d entries, added %d", st.known, st.grey, n)
		}
	})
}

// TestPerlFixtures loads every Perl save-file fixture and checks what was
// loaded, skipped and how the loaded state answers.
func TestPerlFixtures(t *testing.T) {
	for _, tt := range []struct {
		file                  string
		known, grey, exp, bad int
		steps                 []step
	}{
		{"normal.save", 2, 3, 0, 0, []step{
			{0, req("192.0.2.1", alice, bob), AcceptKnownIP, nil},
			{0, req("198.51.100.20", alice, bob), AcceptKnownIP, nil},
			{0, req("192.0.2.7", alice, bob), AcceptRetried, nil},
			{0, req("192.0.2.5", alice, bob), GreyNew, nil},
		}},
		{"ipv6.save", 1, 1, 0, 0, []step{
			{0, req("2001:DB8::1", alice, bob), AcceptKnownIP, nil},
			{0, req("2001:db8:0:0::7", alice, bob), AcceptRetried, nil},
		}},
		{"odd_lines.save", 1, 1, 0, 5, []step{
			{0, req("192.0.2.1", alice, bob), AcceptKnownIP, nil},
			{0, req("192.0.2.7", alice, bob), AcceptRetried, nil},
		}},
		{"crlf.save", 1, 1, 0, 0, []step{
			{0, req("192.0.2.7", alice, bob), AcceptRetried, nil},
		}},
		{"expired.save", 1, 1, 4, 0, []step{
			{0, req("192.0.2.99", alice, bob), GreyNew, nil},
			{0, req("192.0.2.97", alice, bob), AcceptKnownIP, nil},
			{0, req("192.0.2.8", "old@sender.example", "carol@rcpt.example"), GreyNew, nil},
			{0, req("192.0.2.8", "old@sender.example", "dave@rcpt.example"), GreyStale, nil},
		}},
	} {
		t.Run(tt.file, func(t *testing.T) {
			clock := newFakeClock()
			data, err := os.ReadFile(filepath.Join("testdata", "perl", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "state")
			os.WriteFile(path, data, 0o600)
			s := newTestSnapshotter(t, path, clock)
			st, err := s.load()
			if err != nil {
				t.Fatal(err)
			}
			if st.format != "perl" || st.known != tt.known || st.grey != tt.grey || st.expired != tt.exp || st.bad != tt.bad {
				t.Fatalf("got %+v, want known %d grey %d expired %d bad %d", st, tt.known, tt.grey, tt.exp, tt.bad)
			}
			runSteps(t, NewGreylister(s.table, testPolicy, nil, clock.now), clock, tt.steps)
		})
	}
}
