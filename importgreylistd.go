package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"time"
)

// This file is the import-greylistd subcommand: it carries greylistd's
// entries over into greydaemon's state file, for a site moving from
// greylistd. greylistd's states file keys each entry by Python's hash() of
// its data string, which no later process can compute again; its triplets
// file maps those same hashes to the text (when savetriplets is on, the
// default). An entry found in both is imported with its list, times and
// count; an entry without text cannot be.

// greylistdImport counts what an import found.
type greylistdImport struct {
	imported, expired, noText, present, bad int
}

// importGreylistdCommand runs `greydaemon import-greylistd [-c config.toml]
// [flags] STATES TRIPLETS`: it adds greylistd's entries to the state file
// that the settings name, which no daemon may be running on.
func importGreylistdCommand(args []string, w io.Writer, now func() time.Time) error {
	if len(args) < 2 || strings.HasPrefix(args[len(args)-1], "-") || strings.HasPrefix(args[len(args)-2], "-") {
		return fmt.Errorf("%w: import-greylistd takes greylistd's states file and its triplets file", errUsage)
	}
	statesPath, tripletsPath := args[len(args)-2], args[len(args)-1]
	set, err := parseCommandLine(args[:len(args)-2])
	if err != nil {
		return err
	}
	texts, badTexts, err := readGreylistdTriplets(tripletsPath)
	if err != nil {
		return err
	}
	lock, err := lockStateFile(set.StateFile, nil)
	if err != nil {
		return err
	}
	defer lock.Close()
	tbl := newTable(shardsFor(set.MaxEntries), set.MaxEntries)
	policy := func() Policy { return set.Policy }
	snap := &snapshotter{path: set.StateFile, table: tbl, policy: policy, now: now, grouping: set.Grouping}
	loaded, err := snap.load()
	if err != nil {
		return fmt.Errorf("cannot read the state file to add to: %w", err)
	}
	if loaded.format == "perl" {
		return fmt.Errorf("%q is a Perl save file: start greydaemon on it once (it becomes a snapshot), then import", set.StateFile)
	}
	f, err := os.Open(statesPath)
	if err != nil {
		return fmt.Errorf("cannot open %q: %w", statesPath, err)
	}
	defer f.Close()
	t := uint32(max(now().Unix(), 0))
	exp := set.Policy.expiry()
	var st greylistdImport
	st.bad = badTexts
	var words []byte
	err = readGreylistdStates(f, statesPath, func(hash int64, e listEntry) {
		text, ok := texts[hash]
		switch {
		case !ok:
			st.noText++
			return
		case e.expired(t, exp):
			st.expired++
			return
		}
		words, _ = appendListWords(words[:0], []byte(text))
		if tbl.restoreList(listKeyOf(words), e, t, exp) {
			st.imported++
		} else {
			st.present++
		}
	}, func(string) { st.bad++ })
	if err != nil {
		return err
	}
	if _, err := snap.save(); err != nil {
		return err
	}
	fmt.Fprintf(w, "imported %d greylistd entries into %s; %d expired, %d without text in %s (cannot be carried over), %d already held, %d unreadable lines\n",
		st.imported, set.StateFile, st.expired, st.noText, tripletsPath, st.present, st.bad)
	return nil
}

// readGreylistdTriplets reads greylistd's triplets file, "HASH = TEXT"
// lines, and returns the text by hash and the number of lines it could not
// read. A missing file is an error: without it nothing can be imported.
func readGreylistdTriplets(path string) (map[int64]string, int, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fmt.Errorf("cannot open %q: %w (greylistd writes it when savetriplets is on; without it no entry can be carried over)", path, err)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("cannot open %q: %w", path, err)
	}
	defer f.Close()
	texts := map[int64]string{}
	bad := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		key, text, ok := strings.Cut(sc.Text(), " = ")
		hash, err := strconv.ParseInt(key, 10, 64)
		if !ok || err != nil {
			bad++
			continue
		}
		texts[hash] = text
	}
	if err := sc.Err(); err != nil {
		return nil, 0, fmt.Errorf("cannot read %q: %w", path, err)
	}
	return texts, bad, nil
}

// readGreylistdStates reads greylistd's states file: sections [white],
// [grey] and [black] of "HASH = LAST FIRST COUNT" lines, and others
// ([statistics]) that it skips. It calls add for every entry and bad for
// every line it cannot read.
func readGreylistdStates(r io.Reader, name string, add func(hash int64, e listEntry), bad func(line string)) error {
	sc := bufio.NewScanner(r)
	var state listState // 0: a section to skip
	sections := 0
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
			continue
		case strings.HasPrefix(line, "[") && strings.Contains(line, "]"):
			state, _ = parseListState([]byte(strings.ToLower(strings.TrimSpace(line[1:strings.Index(line, "]")]))))
			if state != 0 {
				sections++
			}
			continue
		case state == 0:
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		hash, err := strconv.ParseInt(strings.TrimSpace(key), 10, 64)
		fields := strings.Fields(value)
		if !ok || err != nil || len(fields) != 3 {
			bad(line)
			continue
		}
		var n [3]uint32
		for i, s := range fields {
			v, err := strconv.ParseUint(s, 10, 32)
			if err != nil {
				ok = false
			}
			n[i] = uint32(v)
		}
		if !ok {
			bad(line)
			continue
		}
		add(hash, listEntry{last: n[0], first: n[1], count: n[2], state: state})
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("cannot read %q: %w", name, err)
	}
	if sections == 0 {
		return fmt.Errorf("%q is not a greylistd states file: it has no [white], [grey] or [black] section", name)
	}
	return nil
}
