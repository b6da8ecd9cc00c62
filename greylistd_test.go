package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// newTestListBook returns a listBook over a fresh table with greylistd's
// default limits (retry_min 10m, retry_max 8h, expire 60d) and a fake clock.
func newTestListBook(t testing.TB) (*listBook, *fakeClock) {
	t.Helper()
	g, clock := newTestGreylister(t, "")
	p := testPolicy
	p.ListRetryMin, p.ListRetryMax, p.ListExpire = 600, 8*3600, 60*86400
	g.SetRules(p, nil)
	return newListBook(g), clock
}

// ask sends one request to b as the socket would and returns the reply.
func ask(b *listBook, request string) string {
	var r listRequest
	perr := r.parse([]byte(request))
	return string(b.answer(nil, &r, perr))
}

func TestListParse(t *testing.T) {
	for _, tc := range []struct {
		in, cmd, options, data, err string
	}{
		{in: "--grey 192.0.2.0 a@example.org b@example.net", cmd: "update", options: "grey", data: "192.0.2.0 a@example.org b@example.net"},
		{in: "update --grey 1.2.3.4 x y", cmd: "update", options: "grey", data: "1.2.3.4 x y"},
		{in: "CHECK  \t192.0.2.1\r\n  A@Example.ORG  ", cmd: "check", data: "192.0.2.1 a@example.org"},
		{in: "192.0.2.1 a b", cmd: "update", data: "192.0.2.1 a b"},
		{in: "updates 192.0.2.1", cmd: "update", data: "updates 192.0.2.1"}, // not a command: part of the data
		{in: "add ---black -x data", cmd: "add", options: "black,x", data: "data"},
		{in: "add - data", cmd: "add", options: "", data: "data"},
		{in: "delete 1.2.3.4\x1fa\x1cb", cmd: "delete", data: "1.2.3.4 a b"},
		{in: "status a\xe9b", cmd: "status", data: "a\x80b"},
		{in: "stats", cmd: "stats"},
		{in: "stats --white", cmd: "stats", options: "white"},
		{in: "clear --grey --black", cmd: "clear", options: "grey,black"},
		{in: "", err: "No data received"},
		{in: " \t\r\n", err: "No data received"},
		{in: "check", cmd: "check", err: "Missing argument"},
		{in: "--grey", cmd: "update", options: "grey", err: "Missing argument"},
		{in: "add --white", cmd: "add", options: "white", err: "Missing argument"},
		{in: "stats now", cmd: "stats", data: "now", err: "Too many arguments"},
		{in: "save -x y", cmd: "save", options: "x", data: "y", err: "Too many arguments"},
		{in: "x -grey y", cmd: "update", data: "x -grey y"}, // options only before the data
	} {
		var r listRequest
		err := r.parse([]byte(tc.in))
		var opts []string
		for i := range r.options {
			opts = append(opts, string(r.option(i)))
		}
		got := [4]string{err, "", strings.Join(opts, ","), string(r.dataBytes())}
		want := [4]string{tc.err, "", tc.options, tc.data}
		if err == "" || tc.cmd != "" {
			got[1], want[1] = listCommandNames[r.cmd], tc.cmd
		}
		if got != want {
			t.Errorf("parse(%q) = err %q, cmd %q, options %q, data %q; want %q", tc.in, got[0], got[1], got[2], got[3], want)
		}
	}
}

// TestListRules walks greylistd's rules with a fake clock: every answer
// here is what greylistd 0.9 answers to the same sequence (the oracle test
// in greylistd_real_test.go checks a shorter one against the real daemon).
func TestListRules(t *testing.T) {
	b, clock := newTestListBook(t)
	const data = "192.0.2.0 a@example.org b@example.net"
	steps := []struct {
		advance time.Duration
		request string
		want    string
	}{
		{0, "check " + data, "grey"},                   // unseen: grey, and not recorded
		{0, "status " + data, "unseen"},                // check recorded nothing
		{0, "--grey " + data, "true"},                  // update: recorded grey
		{0, "status " + strings.ToUpper(data), "grey"}, // case does not matter
		{0, "update --white " + data, "false"},
		{600 * time.Second, "check --grey " + data, "true"}, // exactly retry_min: still grey (strictly later)
		{0, "update " + data, "grey"},
		{time.Second, "check " + data, "white"}, // first seen 601 s ago
		{0, "status " + data, "grey"},           // check does not move it
		{0, "--grey " + data, "false"},          // update moves it
		{0, "status " + data, "white"},
		{0, "update --black " + data, "false"},
		{0, "update --bogus " + data, "error: 'bogus' is not a known state"},
		{0, "add --black " + data, "Added to blacklist"},
		{0, "update " + data, "black"},
		{0, "delete " + data, "Removed from blacklist"},
		{0, "delete " + data, "error: Not found"},
		{0, "add " + data, "Added to whitelist"},
		{0, "add --purple " + data, "error: No such list: 'purple'"},
		{0, "add --grey x", "Added to greylist"},
		{601 * time.Second, "update x", "white"},
		{0, "list", "error: Original triplet data is not retained."},
		{0, "check", "error: Missing argument"},
		{0, "", "error: No data received"},
		{0, "stats extra", "error: Too many arguments"},
		{0, "update \xff\xfe", "grey"},
		{0, "check --grey \xee\xef", "true"}, // non-ASCII bytes are all one character, as in greylistd
		{0, "add --\xe9 y", "error: No such list: '?'"},
	}
	for i, s := range steps {
		clock.advance(s.advance)
		if got := ask(b, s.request); got != s.want {
			t.Fatalf("step %d: %q answered %q, want %q", i, s.request, got, s.want)
		}
	}
}

func TestListExpiry(t *testing.T) {
	b, clock := newTestListBook(t)
	ask(b, "update g")      // grey
	ask(b, "add --white w") // white
	clock.advance(8 * time.Hour)
	if got := ask(b, "status g"); got != "grey" {
		t.Fatalf("grey entry after exactly retry_max: %q, want grey (greylistd drops it only after)", got)
	}
	ask(b, "check g") // check does not touch it
	clock.advance(time.Second)
	if got := ask(b, "status g"); got != "unseen" {
		t.Fatalf("grey entry after retry_max: %q, want unseen", got)
	}
	if got := ask(b, "update g"); got != "grey" {
		t.Fatalf("expired grey entry updated: %q, want grey (new)", got)
	}
	ask(b, "update w") // seen: its 60 days start again
	clock.advance(60 * 24 * time.Hour)
	if got := ask(b, "status w"); got != "white" {
		t.Fatalf("white entry 60 days after its last request: %q, want white", got)
	}
	clock.advance(time.Second)
	if got := ask(b, "status w"); got != "unseen" {
		t.Fatalf("white entry after expire: %q, want unseen", got)
	}

	// A grey entry that keeps asking stays until it turns white: greylistd
	// dates a grey entry's expiry from its last request.
	ask(b, "update r")
	for range 5 {
		clock.advance(7 * time.Hour)
		ask(b, "check r")
	}
	if got := ask(b, "status r"); got != "unseen" {
		t.Fatalf("grey entry only checked for 35 h: %q, want unseen", got)
	}
}

func TestListStats(t *testing.T) {
	b, clock := newTestListBook(t)
	start := clock.now()
	for _, d := range []string{"a", "b", "c", "d"} {
		ask(b, "update "+d)
	}
	clock.advance(11 * time.Minute)
	ask(b, "update a")      // a: white
	ask(b, "update a")      // a matched twice on the white list
	ask(b, "delete b")      // b: gone from the grey list
	ask(b, "add --black z") // z: black
	ask(b, "update c")      // c: white
	clock.advance(8 * time.Hour)
	ask(b, "update new") // new grey; d has expired
	title := "Statistics since " + start.Format("Mon Jan _2 15:04:05 2006") + " (8 hours and 11 minutes ago)"
	want := title + "\n" + strings.Repeat("-", len(title)) + "\n" +
		"2 items, matching 3 requests, are currently whitelisted\n" +
		"1 items, matching 1 requests, are currently greylisted\n" +
		"1 items, matching 1 requests, are currently blacklisted\n" +
		"\n" +
		"Of 4 items that were initially greylisted:\n" +
		" - 2 ( 50.0%) became whitelisted\n" +
		" - 2 ( 50.0%) expired from the greylist\n"
	if got := ask(b, "stats"); got != want {
		t.Fatalf("stats:\n%s\nwant:\n%s", got, want)
	}
	mrtg := ask(b, "mrtg")
	if lines := strings.Split(mrtg, "\n"); len(lines) != 5 || lines[0] != "5" || lines[1] != "2" || lines[2] != "8 hours and 11 minutes" {
		t.Fatalf("mrtg: %q", mrtg)
	}
	if got := ask(b, "clear --grey --bogus"); got != "error: Invalid list: 'bogus'" {
		t.Fatalf("clear with a bad list: %q", got)
	}
	if got := ask(b, "status new"); got != "unseen" {
		t.Fatalf("clear --grey left the grey entry: %q", got)
	}
	if got := ask(b, "status a"); got != "white" {
		t.Fatalf("clear --grey removed a white entry: %q", got)
	}
	if got := ask(b, "clear"); got != "data and statistics cleared" {
		t.Fatalf("clear: %q", got)
	}
	if got := ask(b, "status a"); got != "unseen" {
		t.Fatalf("after clear: %q", got)
	}
	if got := ask(b, "save"); got != "error: Cannot save: no state file" {
		t.Fatalf("save without a daemon: %q", got)
	}
}

func TestListDuration(t *testing.T) {
	// The expected words are what greylistd's duration() returns.
	for secs, want := range map[int64]string{
		0: "0 second", 1: "1 second", 2: "2 seconds", 59: "59 seconds", 60: "1 minute",
		61: "1 minute and 1 second", 62: "1 minute and 2 seconds", 119: "1 minute and 59 seconds",
		120: "2 minutes", 3599: "59 minutes and 59 seconds", 3600: "1 hour", 3629: "1 hour",
		3630: "1 hour and 1 minute", 7199: "2 hours", 86369: "23 hours and 59 minutes",
		86370: "1 day", 90000: "1 day and 1 hour", 172800: "2 days", 5184000: "60 days", -5: "-5 second",
	} {
		if got := listDuration(secs); got != want {
			t.Errorf("listDuration(%d) = %q, want %q", secs, got, want)
		}
	}
}

// TestListEntriesInTable checks that greylistd's entries share the
// table's cap with the qmail entries, that a full table drops grey ones
// before white ones, and that they survive a snapshot.
func TestListEntriesInTable(t *testing.T) {
	clock := newFakeClock()
	p := testPolicy
	p.ListRetryMin, p.ListRetryMax, p.ListExpire = 600, 8*3600, 60*86400
	g := NewGreylister(newTable(1, 1000), p, nil, clock.now)
	b := newListBook(g)
	for i := range 400 {
		ask(b, "add --white w"+itoa(i))
	}
	for i := range 400 {
		ask(b, "update g"+itoa(i)) // grey
	}
	for i := range 400 {
		ask(b, "add --black k"+itoa(i))
	}
	if n := g.table.listCount(); n > g.table.capacity() || n < g.table.capacity()*9/10 {
		t.Fatalf("%d greylistd entries held; cap %d", n, g.table.capacity())
	}
	for i := range 400 {
		if got := ask(b, "status w"+itoa(i)); got != "white" {
			t.Fatalf("w%d: %q; a white entry went while grey ones remained", i, got)
		}
	}
	tot := g.table.countLists(g.clock(), p.expiry())
	if tot.entries[listBlack] != 400 || tot.entries[listGrey] == 0 || tot.entries[listGrey] == 400 {
		t.Fatalf("held %v; want every white and black entry and some of the grey ones", tot.entries)
	}

	path := filepath.Join(t.TempDir(), "state")
	snap := &snapshotter{path: path, table: g.table, policy: g.Policy, now: clock.now}
	if _, err := snap.save(); err != nil {
		t.Fatal(err)
	}
	clock.advance(time.Hour)
	loaded := &snapshotter{path: path, table: newTable(16, 100_000), policy: g.Policy, now: clock.now}
	st, err := loaded.load()
	if err != nil {
		t.Fatal(err)
	}
	if st.lists != g.table.listCount() {
		t.Fatalf("loaded %d greylistd entries, want %d", st.lists, g.table.listCount())
	}
	b2 := newListBook(NewGreylister(loaded.table, p, nil, clock.now))
	for _, tc := range [][2]string{{"w7", "white"}, {"k399", "black"}} {
		if got := ask(b2, "status "+tc[0]); got != tc[1] {
			t.Fatalf("after the load, %s is %q, want %q", tc[0], got, tc[1])
		}
	}
	// A grey entry first seen over an hour ago is white on its next update,
	// as it would have been without the restart.
	for i := range 400 {
		if ask(b, "status g"+itoa(i)) == "grey" {
			if got := ask(b2, "update g"+itoa(i)); got != "white" {
				t.Fatalf("a grey entry retried after the restart: %q, want white", got)
			}
			break
		}
	}
}

// FuzzListRequest parses and answers arbitrary requests: nothing panics,
// the text is the request's words as Python's split() finds them, joined
// by single spaces, and every answer is one of greylistd's forms.
func FuzzListRequest(f *testing.F) {
	for _, s := range []string{"--grey 192.0.2.0 a b", "add --black x", "stats", "", "check", "clear --grey", "\xff update", "-- - ---"} {
		f.Add([]byte(s))
	}
	b, _ := newTestListBook(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) > listRequestMax {
			return
		}
		var r listRequest
		perr := r.parse(in)
		mapped := make([]byte, len(in))
		for i, c := range in {
			switch {
			case c >= 'A' && c <= 'Z':
				c += 'a' - 'A'
			case c > 0x7f:
				c = nonASCII
			}
			mapped[i] = c
		}
		words := strings.FieldsFunc(string(mapped), func(c rune) bool { return c < 0x80 && isListSpace(byte(c)) })
		if string(r.text) != strings.Join(words, " ") {
			t.Fatalf("parse(%q): text %q, want the words %q", in, r.text, words)
		}
		if r.cmd == cmdSave || r.cmd == cmdClear {
			return // they act on the whole book
		}
		reply := string(b.answer(nil, &r, perr))
		switch {
		case perr != "" && reply != "error: "+perr:
			t.Fatalf("%q: parse error %q answered %q", in, perr, reply)
		case reply == "":
			t.Fatalf("%q: empty answer", in)
		case r.cmd != cmdStats && r.cmd != cmdMrtg && strings.ContainsAny(reply, "\n\r"):
			t.Fatalf("%q: answer %q has a line break", in, reply)
		}
	})
}

// TestImportGreylistd imports greylistd's files (in the form greylistd 0.9
// writes them) into a state file that holds qmail entries already.
func TestImportGreylistd(t *testing.T) {
	dir := t.TempDir()
	clock := newFakeClock()
	now := clock.unix.Load()
	states := filepath.Join(dir, "states")
	triplets := filepath.Join(dir, "triplets")
	os.WriteFile(states, fmt.Appendf(nil, `[white]
3211087187477917295 = %[1]d %[2]d 4

[grey]
2782530476459101225 = %[1]d %[1]d 1
1111 = %[1]d %[1]d 1
5 = %[3]d %[3]d 1

[black]
-7034643071780532431 = %[1]d %[1]d 2
9 = not numbers

[statistics]
white = 1
grey = 2
start = %[2]d
`, now-100, now-5000, now-9*3600), 0o644)
	os.WriteFile(triplets, []byte("3211087187477917295 = 1.2.3.0/24 A@b c@d\n"+
		"-7034643071780532431 = spam.example\n2782530476459101225 = x y z\n5 = old grey\nnonsense\n"), 0o644)

	cfg := defaultConfig()
	cfg.StateFile = filepath.Join(dir, "greydaemon.state")
	// A state file with a qmail entry, which the import must keep.
	addr, stop := startDaemon(t, cfg, clock.now)
	exchange(t, dial(t, addr), req("192.0.2.1", "a@example.org", "b@example.net"), time.Second)
	stop()
	var out bytes.Buffer
	args := []string{"-c", writeTemp(t, "g.toml", "state_file = \""+cfg.StateFile+"\"\n"), states, triplets}
	if err := importGreylistdCommand(args, &out, clock.now); err != nil {
		t.Fatal(err)
	}
	want := "imported 3 greylistd entries into " + cfg.StateFile + "; 1 expired, 1 without text in " + triplets +
		" (cannot be carried over), 0 already held, 2 unreadable lines\n"
	if out.String() != want {
		t.Fatalf("import said %q, want %q", out.String(), want)
	}
	if n := greyInState(t, cfg.StateFile); n != 1 {
		t.Fatalf("after the import the state file holds %d grey triplets, want the 1 it held", n)
	}
	td, path := startListDaemon(t, clock, func(c *Config) { c.StateFile = cfg.StateFile })
	defer td.stop(t)
	for _, tc := range [][2]string{{"1.2.3.0/24 a@b c@d", "white"}, {"spam.example", "black"}, {"x y z", "grey"}, {"old grey", "unseen"}} {
		if got := askSocket(t, path, "status "+tc[0], true); got != tc[1] {
			t.Errorf("after the import, %q is %q, want %q", tc[0], got, tc[1])
		}
	}
	if got := askSocket(t, path, "stats", true); !strings.Contains(got, "1 items, matching 4 requests, are currently whitelisted") {
		t.Errorf("the white entry's count was not imported:\n%s", got)
	}

	// A second import while the daemon runs is refused: it holds the lock.
	err := importGreylistdCommand(args, &out, clock.now)
	if err == nil || !strings.Contains(err.Error(), "lock") && !strings.Contains(err.Error(), "running") {
		t.Fatalf("import while the daemon runs: %v", err)
	}
}

// TestReadGreylistdStates reads a states file line by line: LAST comes
// before FIRST in greylistd's lines, a non-number is a bad line (not a 0),
// the [statistics] section is skipped, and a file with no list section is
// not a states file.
func TestReadGreylistdStates(t *testing.T) {
	text := "[statistics]\nstart = 1\n\n[white]\n17 = 1700000500 1700000100 4\n18 = 1700000500 x 4\n[Grey]\n-5 = 1700000900 1700000800 1\n"
	var got []listEntry
	var hashes []int64
	var bad []string
	err := readGreylistdStates(strings.NewReader(text), "states",
		func(h int64, e listEntry) { hashes, got = append(hashes, h), append(got, e) },
		func(line string) { bad = append(bad, line) })
	if err != nil {
		t.Fatal(err)
	}
	want := []listEntry{{first: 1700000100, last: 1700000500, count: 4, state: listWhite}, {first: 1700000800, last: 1700000900, count: 1, state: listGrey}}
	if !slices.Equal(got, want) || !slices.Equal(hashes, []int64{17, -5}) {
		t.Errorf("entries %+v %v, want %+v [17 -5]", got, hashes, want)
	}
	if !slices.Equal(bad, []string{"18 = 1700000500 x 4"}) {
		t.Errorf("bad lines %q", bad)
	}
	for _, text := range []string{"a = 1 2 3\n[statistics]\nx = 1\n", "a = 1 2 3\n", ""} {
		err = readGreylistdStates(strings.NewReader(text), "notstates", func(int64, listEntry) {}, func(string) {})
		if err == nil || !strings.Contains(err.Error(), `"notstates" is not a greylistd states file: it has no [white], [grey] or [black] section`) {
			t.Errorf("%q, with no list section: %v", text, err)
		}
	}
}
