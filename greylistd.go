package main

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/zeebo/xxh3"
)

// This file is greylistd's protocol and its rules, for Exim. greylistd (the
// Debian package, version 0.9) answers one request per connection on a unix
// socket: a line such as "--grey 192.0.2.0 a@example.org b@example.net",
// answered with "true" or "false", or "white", "grey" or "black", and no
// newline. Its rules are not the Perl daemon's: the key is the whole data
// string, whatever words the ACL sends, and an entry moves from the grey
// list to the white list on the first update after greylistd_retry_min.
// The entries live in the table beside the qmail ones, in a map of their own,
// and in the snapshots, so that unlike greylistd's (keyed by Python's
// per-process string hash) they survive a restart. The socket server is in
// greylistdserver.go.

// listRequestMax is the most of a request one read takes: greylistd answers
// what one recv(16384) brings.
const listRequestMax = 16384

// A listCommand is one of greylistd's commands.
type listCommand uint8

const (
	cmdUpdate listCommand = iota // the default when the first word is no command
	cmdCheck
	cmdAdd
	cmdDelete
	cmdStatus
	cmdStats
	cmdMrtg
	cmdList
	cmdClear
	cmdSave
	cmdReload
	numListCommands
)

// listCommandNames are the commands' words, in listCommand order.
var listCommandNames = [numListCommands]string{
	"update", "check", "add", "delete", "status", "stats", "mrtg", "list", "clear", "save", "reload",
}

// takesData reports whether c works on a data string; the others take
// options only.
func (c listCommand) takesData() bool { return c <= cmdStatus }

// String returns the list's name, as greylistd writes it.
func (s listState) String() string {
	switch s {
	case listWhite:
		return "white"
	case listGrey:
		return "grey"
	case listBlack:
		return "black"
	}
	return "unseen"
}

// parseListState returns the list named b, as greylistd's options name them.
func parseListState(b []byte) (listState, bool) {
	switch string(b) {
	case "white":
		return listWhite, true
	case "grey":
		return listGrey, true
	case "black":
		return listBlack, true
	}
	return 0, false
}

// A listRequest is a request parsed the way greylistd parses it: the text
// lowercased and split at white space, the first word taken as the command
// when it names one, then every word that starts with "-" as an option
// (dashes removed), and the rest, joined by single spaces, as the data.
type listRequest struct {
	cmd     listCommand
	options []span // in text
	data    span   // in text; empty when there is none
	text    []byte // the words, lowercased, joined by single spaces
}

// option returns the i'th option.
func (r *listRequest) option(i int) []byte {
	return r.text[r.options[i].off:r.options[i].end]
}

// dataBytes returns the data string.
func (r *listRequest) dataBytes() []byte { return r.text[r.data.off:r.data.end] }

// isListSpace reports whether c separates words, as Python's str.split()
// (with no argument) decides for ASCII.
func isListSpace(c byte) bool {
	return c == ' ' || c >= '\t' && c <= '\r' || c >= 0x1c && c <= 0x1f
}

// nonASCII stands for every byte above 0x7f in a request's text: greylistd
// decodes requests as ASCII, replacing each such byte with U+FFFD, so two
// requests that differ only there are one data string. Replies show it as
// "?", as greylistd's ASCII encoding of U+FFFD does.
const nonASCII = 0x80

// parse parses req into r, reusing r's memory. It returns "" or, for a
// request greylistd refuses before it runs a command, the reason.
func (r *listRequest) parse(req []byte) string {
	r.cmd, r.options, r.data = cmdUpdate, r.options[:0], span{}
	var firstEnd int32 // where the first word ends
	r.text, firstEnd = appendListWords(r.text[:0], req)
	if len(r.text) == 0 {
		return "No data received"
	}
	pos := int32(0) // where the words after the command start
	for c, name := range listCommandNames {
		if string(r.text[:firstEnd]) == name {
			r.cmd = listCommand(c)
			pos = min(firstEnd+1, int32(len(r.text)))
			break
		}
	}
	// Options: each word from pos that starts with '-'.
	for pos < int32(len(r.text)) && r.text[pos] == '-' {
		end := pos
		for end < int32(len(r.text)) && r.text[end] != ' ' {
			end++
		}
		off := pos
		for off < end && r.text[off] == '-' {
			off++
		}
		r.options = append(r.options, span{off, end})
		pos = min(end+1, int32(len(r.text)))
	}
	r.data = span{pos, int32(len(r.text))}
	switch hasData := r.data.end > r.data.off; {
	case r.cmd.takesData() && !hasData:
		return "Missing argument"
	case !r.cmd.takesData() && hasData:
		return "Too many arguments"
	}
	return ""
}

// appendListWords appends the words of b to dst as greylistd sees them:
// lowercased, bytes above 0x7f as nonASCII, split at white space and joined
// by single spaces. It also returns where the first word ends in dst.
func appendListWords(dst, b []byte) ([]byte, int32) {
	start := len(dst)
	firstEnd := int32(-1)
	inWord := false
	for _, c := range b {
		if isListSpace(c) {
			if inWord && firstEnd < 0 {
				firstEnd = int32(len(dst))
			}
			inWord = false
			continue
		}
		if !inWord && len(dst) > start {
			dst = append(dst, ' ')
		}
		inWord = true
		switch {
		case c >= 'A' && c <= 'Z':
			c += 'a' - 'A'
		case c > 0x7f:
			c = nonASCII
		}
		dst = append(dst, c)
	}
	if firstEnd < 0 {
		firstEnd = int32(len(dst))
	}
	return dst, firstEnd
}

// appendListText appends b to dst as a reply shows request text.
func appendListText(dst, b []byte) []byte {
	for _, c := range b {
		if c == nonASCII {
			c = '?'
		}
		dst = append(dst, c)
	}
	return dst
}

// listKeyOf returns the key of a data string.
func listKeyOf(data []byte) listKey { return listKey(xxh3.Hash128(data).Bytes()) }

// A listBook keeps greylistd's lists in a table: it runs the commands that
// change or read them, and counts what greylistd's stats command reports.
type listBook struct {
	g     *Greylister // its table, clock and limits
	added [listBlack + 1]atomic.Uint64
	// answered counts answers by command and list (0: none), for metrics.
	answered [numListCommands][listBlack + 1]atomic.Uint64
	start    atomic.Int64 // unix time the statistics start
	// save, if set, writes a snapshot now (the save command).
	save func() error
	// remote, if set, holds the entries instead of the table (Redis
	// mode); the table serves when it cannot answer.
	remote *redisStore
}

// newListBook returns a listBook on g's table, its statistics starting now.
func newListBook(g *Greylister) *listBook {
	b := &listBook{g: g}
	b.start.Store(g.now().Unix())
	return b
}

// limits returns the limits in force.
func (b *listBook) limits() (Policy, expiry) {
	r := b.g.rules.Load()
	return r.policy, r.expiry
}

// answer appends the reply to the request r (already parsed, with parseErr
// what parse returned) to dst.
func (b *listBook) answer(dst []byte, r *listRequest, parseErr string) []byte {
	if parseErr != "" {
		return append(append(dst, "error: "...), parseErr...)
	}
	now := b.g.clock()
	switch r.cmd {
	case cmdUpdate, cmdCheck:
		return b.check(dst, r, now, r.cmd == cmdUpdate)
	case cmdAdd:
		return b.add(dst, r, now)
	case cmdDelete:
		state := b.delete(listKeyOf(r.dataBytes()), now)
		b.answered[cmdDelete][state].Add(1)
		if state == 0 {
			return append(dst, "error: Not found"...)
		}
		return append(append(append(dst, "Removed from "...), state.String()...), "list"...)
	case cmdStatus:
		state := b.status(listKeyOf(r.dataBytes()), now)
		b.answered[cmdStatus][state].Add(1)
		return append(dst, state.String()...) // "unseen" for none
	case cmdStats:
		return b.stats(dst, now)
	case cmdMrtg:
		return b.mrtg(dst, now)
	case cmdList:
		// greylistd's own answer when it keeps no triplet text: the table
		// holds fingerprints only.
		return append(dst, "error: Original triplet data is not retained."...)
	case cmdClear:
		return b.clear(dst, r, now)
	case cmdSave:
		if b.save == nil {
			return append(dst, "error: Cannot save: no state file"...)
		}
		if err := b.save(); err != nil {
			return fmt.Appendf(dst, "error: Cannot save: %v", err)
		}
		return append(dst, "greylistd data has been saved"...)
	}
	return append(dst, "error: reload is not done over the socket: send greydaemon SIGHUP (systemctl reload greydaemon)"...)
}

// check runs check and, when update is set, update: the entry's list now
// (grey for a data string never seen; white for a grey one first seen more
// than greylistd_retry_min ago), recorded as greylistd's do_add does.
func (b *listBook) check(dst []byte, r *listRequest, now uint32, update bool) []byte {
	truth := listState(0)
	if len(r.options) > 0 {
		var ok bool
		if truth, ok = parseListState(r.option(0)); !ok {
			dst = append(dst, "error: '"...)
			return append(appendListText(dst, r.option(0)), "' is not a known state"...)
		}
	}
	p, exp := b.limits()
	k := listKeyOf(r.dataBytes())
	state, decided := b.checkRemote(k, now, update)
	switch {
	case decided:
	case update:
		var moved bool
		b.g.table.changeList(k, now, exp, func(old listEntry, found bool) (listEntry, bool) {
			state = currentList(old, found, now, p.ListRetryMin)
			next, isNew := addToList(old, found, state, now)
			moved = isNew
			return next, true
		})
		if moved {
			b.added[state].Add(1)
		}
	default:
		old, found := b.g.table.lookupList(k, now, exp)
		state = currentList(old, found, now, p.ListRetryMin)
	}
	cmd := cmdCheck
	if update {
		cmd = cmdUpdate
	}
	b.answered[cmd][state].Add(1)
	switch {
	case truth == 0:
		return append(dst, state.String()...)
	case truth == state:
		return append(dst, "true"...)
	}
	return append(dst, "false"...)
}

// currentList returns the list a data string whose entry is old (found
// false for none) is on at now: grey when unseen, white when grey and first
// seen more than retryMin seconds before now, else its own.
func currentList(old listEntry, found bool, now, retryMin uint32) listState {
	switch {
	case !found:
		return listGrey
	case old.state == listGrey && uint64(old.first)+uint64(retryMin) < uint64(now):
		return listWhite
	}
	return old.state
}

// addToList returns old (found false for none) recorded on list state at
// now, and whether it is new on that list: one more request if it was
// there already, else first seen now, as greylistd's do_add.
func addToList(old listEntry, found bool, state listState, now uint32) (listEntry, bool) {
	if found && old.state == state {
		old.last, old.count = now, old.count+1
		return old, false
	}
	return listEntry{first: now, last: now, count: 1, state: state}, true
}

// add runs add: the data string on the list its option names (white when
// none).
func (b *listBook) add(dst []byte, r *listRequest, now uint32) []byte {
	state := listWhite
	if len(r.options) > 0 {
		var ok bool
		if state, ok = parseListState(r.option(0)); !ok {
			dst = append(dst, "error: No such list: '"...)
			return append(appendListText(dst, r.option(0)), "'"...)
		}
	}
	p, exp := b.limits()
	k := listKeyOf(r.dataBytes())
	var moved bool
	var err error = errRedisDown
	if b.remote != nil {
		_, moved, err = b.remote.listOp(listOpAdd, k, state, now, p)
	}
	if err != nil {
		b.g.table.changeList(k, now, exp, func(old listEntry, found bool) (listEntry, bool) {
			next, isNew := addToList(old, found, state, now)
			moved = isNew
			return next, true
		})
	}
	if moved {
		b.added[state].Add(1)
	}
	b.answered[cmdAdd][state].Add(1)
	return append(append(append(dst, "Added to "...), state.String()...), "list"...)
}

// checkRemote runs check (update when update is set) in Redis, in Redis
// mode, and returns the entry's list and true; or redis_fallback's list and
// true when Redis cannot answer; or false when the table is to decide.
func (b *listBook) checkRemote(k listKey, now uint32, update bool) (listState, bool) {
	if b.remote == nil {
		return 0, false
	}
	op := listOpCheck
	if update {
		op = listOpUpdate
	}
	p, _ := b.limits()
	state, moved, err := b.remote.listOp(op, k, 0, now, p)
	if err != nil {
		return b.remote.listFallback()
	}
	if moved {
		b.added[state].Add(1)
	}
	return state, true
}

// delete removes the entry k and returns the list it was on, 0 for none:
// in Redis in Redis mode (and in the table too, which may hold it from a
// time Redis could not answer), else in the table.
func (b *listBook) delete(k listKey, now uint32) listState {
	p, exp := b.limits()
	var state listState
	if b.remote != nil {
		state, _, _ = b.remote.listOp(listOpDelete, k, 0, now, p)
	}
	old, found := b.g.table.changeList(k, now, exp, func(listEntry, bool) (listEntry, bool) {
		return listEntry{}, false
	})
	if state == 0 && found {
		state = old.state
	}
	return state
}

// status returns the list the entry k is on, 0 for none: Redis's in Redis
// mode while it answers, else the table's.
func (b *listBook) status(k listKey, now uint32) listState {
	p, exp := b.limits()
	if b.remote != nil {
		if state, _, err := b.remote.listOp(listOpStatus, k, 0, now, p); err == nil {
			return state
		}
	}
	e, _ := b.g.table.lookupList(k, now, exp)
	return e.state
}

// clear runs clear: it empties the lists its options name (all when none)
// and their statistics, stopping at the first option that names no list,
// as greylistd does.
func (b *listBook) clear(dst []byte, r *listRequest, now uint32) []byte {
	lists := []listState{listWhite, listGrey, listBlack}
	if len(r.options) > 0 {
		lists = lists[:0]
		for i := range r.options {
			s, ok := parseListState(r.option(i))
			if !ok {
				b.clearLists(lists)
				dst = append(dst, "error: Invalid list: '"...)
				return append(appendListText(dst, r.option(i)), "'"...)
			}
			lists = append(lists, s)
		}
	} else {
		b.start.Store(int64(now))
	}
	b.clearLists(lists)
	return append(dst, "data and statistics cleared"...)
}

// clearLists empties the given lists and their statistics.
func (b *listBook) clearLists(lists []listState) {
	for _, s := range lists {
		b.g.table.clearLists(s)
		b.added[s].Store(0)
	}
}

// stats runs stats, in greylistd's words and layout.
func (b *listBook) stats(dst []byte, now uint32) []byte {
	_, exp := b.limits()
	tot := b.g.table.countLists(now, exp)
	start := b.start.Load()
	title := fmt.Sprintf("Statistics since %s (%s ago)",
		time.Unix(start, 0).Format("Mon Jan _2 15:04:05 2006"), listDuration(int64(now)-start))
	dst = append(dst, title...)
	dst = append(dst, '\n')
	for range title {
		dst = append(dst, '-')
	}
	dst = append(dst, '\n')
	var itemWidth, hitWidth int
	for s := listWhite; s <= listBlack; s++ {
		itemWidth = max(itemWidth, len(strconv.FormatUint(tot.entries[s], 10)))
		hitWidth = max(hitWidth, len(strconv.FormatUint(tot.hits[s], 10)))
	}
	for s := listWhite; s <= listBlack; s++ {
		dst = fmt.Appendf(dst, "%*d items, matching %*d requests, are currently %slisted\n",
			itemWidth, tot.entries[s], hitWidth, tot.hits[s], s)
	}
	previousGrey := int64(b.added[listGrey].Load()) - int64(tot.entries[listGrey])
	if previousGrey != 0 {
		white := int64(b.added[listWhite].Load())
		expiredGrey := previousGrey - white
		w := len(strconv.FormatInt(previousGrey, 10))
		dst = fmt.Appendf(dst, "\nOf %*d items that were initially greylisted:\n", w, previousGrey)
		dst = fmt.Appendf(dst, " - %*d (%5.1f%%) became whitelisted\n", w, white, 100*float64(white)/float64(previousGrey))
		dst = fmt.Appendf(dst, " - %*d (%5.1f%%) expired from the greylist\n", w, expiredGrey, 100*float64(expiredGrey)/float64(previousGrey))
	}
	return dst
}

// mrtg runs mrtg: entries greylisted and whitelisted since the statistics
// started, the time since then, and the host name, one to a line.
func (b *listBook) mrtg(dst []byte, now uint32) []byte {
	host, _ := os.Hostname()
	return fmt.Appendf(dst, "%d\n%d\n%s\n%s\n", b.added[listGrey].Load(), b.added[listWhite].Load(),
		listDuration(int64(now)-b.start.Load()), host)
}

// listDuration writes a number of seconds as greylistd's duration does:
// "45 seconds", "3 minutes and 5 seconds", "2 hours and 10 minutes",
// "3 days and 4 hours".
func listDuration(secs int64) string {
	plural := func(n int64) string {
		if n != 1 {
			return "s"
		}
		return ""
	}
	both := func(n int64, unit string, m int64, sub string) string {
		s := fmt.Sprintf("%d %s%s", n, unit, plural(n))
		if m != 0 {
			s += fmt.Sprintf(" and %d %s%s", m, sub, plural(m))
		}
		return s
	}
	switch {
	case secs < 60:
		// greylistd writes "0 second" and "1 second", plural only above 1.
		if secs > 1 {
			return fmt.Sprintf("%d seconds", secs)
		}
		return fmt.Sprintf("%d second", secs)
	case secs < 3600:
		return both(secs/60, "minute", secs%60, "second")
	case secs+30 < 86400:
		return both((secs+30)/3600, "hour", (secs+30)/60%60, "minute")
	}
	return both((secs+1800)/86400, "day", (secs+1800)/3600%24, "hour")
}
