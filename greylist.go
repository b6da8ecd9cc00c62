package main

import (
	"bytes"
	"context"
	"math"
	"net/netip"
	"sync/atomic"
	"time"
)

// This file holds the greylisting decision, independent of any wire format:
// the qmail UDP protocol (proto.go) and later front ends call checkClient
// once per request and checkRecipient once per recipient.

// A Verdict is the answer to a request. Its two bytes are the reply the qmail
// protocol sends: the high byte is 1 to accept and 0 to greylist, the low
// byte says why.
type Verdict uint16

// The verdicts, as listed in PROTOCOL.md §3.
const (
	AcceptWhitelisted Verdict = 0x0101 // client IP is in the whitelist
	AcceptKnownIP     Verdict = 0x0102 // client IP passed greylisting recently
	AcceptRetried     Verdict = 0x0103 // every recipient was a good retry, or none was given
	AcceptBounce      Verdict = 0x0104 // null sender and a VERP-looking recipient
	GreyNew           Verdict = 0x0001 // new triplet recorded
	GreyTooSoon       Verdict = 0x0002 // retried before the minimum delay
	GreyStale         Verdict = 0x0003 // retried after the resend window; restarted
)

// numVerdicts is the number of verdicts; Verdict.index numbers them.
const numVerdicts = 7

// verdicts lists every verdict in the order of Verdict.index.
var verdicts = [numVerdicts]Verdict{
	AcceptWhitelisted, AcceptKnownIP, AcceptRetried, AcceptBounce,
	GreyNew, GreyTooSoon, GreyStale,
}

// index returns v's position in verdicts, for counting by verdict.
func (v Verdict) index() int {
	if v.Accepts() {
		return int(v&0xff) - 1 // 0x0101..0x0104 -> 0..3
	}
	return 3 + int(v&0xff) // 0x0001..0x0003 -> 4..6
}

// Accepts reports whether v lets the message through.
func (v Verdict) Accepts() bool { return v>>8 != 0 }

// Event returns the word the decision log uses for v, as the Perl daemon
// logs it.
func (v Verdict) Event() string {
	switch v {
	case AcceptWhitelisted:
		return "white"
	case AcceptKnownIP:
		return "ok ip"
	case AcceptRetried:
		return "retry ok"
	case AcceptBounce:
		return "bounce"
	case GreyNew:
		return "new grey"
	case GreyTooSoon:
		return "retry too soon"
	case GreyStale:
		return "stale grey"
	}
	return "unknown verdict"
}

// Reason returns a short name for why v was given, for metrics labels.
func (v Verdict) Reason() string {
	switch v {
	case AcceptWhitelisted:
		return "whitelisted"
	case AcceptKnownIP:
		return "known_ip"
	case AcceptRetried:
		return "retried"
	case AcceptBounce:
		return "bounce"
	case GreyNew:
		return "new"
	case GreyTooSoon:
		return "too_soon"
	case GreyStale:
		return "stale"
	}
	return "unknown"
}

// Policy holds the greylisting time limits, in whole seconds (fractional
// settings rounded up, which for whole-second ages is the same test).
type Policy struct {
	KnownIPLifetime uint32 // -t: a known IP is accepted for this long after it was last seen
	ResendWindow    uint32 // -g: a retry must come within this long of the first attempt
	MinResendDelay  uint32 // -m: a retry must come at least this long after the first attempt

	// greylistd's limits, for its protocol (greylistd.go).
	ListRetryMin uint32 // greylistd_retry_min: a grey entry first seen more than this long ago turns white
	ListRetryMax uint32 // greylistd_retry_max: a grey entry last seen more than this long ago goes
	ListExpire   uint32 // greylistd_expire: a white or black entry last seen more than this long ago goes
}

// staleGrace is how long a grey triplet is held after its resend window
// ends, so that a retry just past the window gets the Perl daemon's "stale"
// answer rather than "new".
const staleGrace = 60

// expiry returns when the table may forget entries under p.
func (p Policy) expiry() expiry {
	grey := uint64(p.ResendWindow) + staleGrace
	return expiry{knownLifetime: p.KnownIPLifetime, greyLifetime: uint32(min(grey, math.MaxUint32)),
		listGreyLifetime: p.ListRetryMax, listLifetime: p.ListExpire}
}

// A Greylister makes greylisting decisions against a table. It is safe for
// concurrent use; its rules (time limits and whitelist) can be replaced
// while it decides, as a reload does.
type Greylister struct {
	table *table
	rules atomic.Pointer[rules]
	now   func() time.Time

	// Fixed for the Greylister's life: they shape the keys, so changing
	// them means other keys for the same clients.
	grouping  addrGrouping
	normalize bool
	// remote, if set, decides in a store shared with other daemons
	// (Redis, redis.go).
	remote remoteDecider
	// retryDelays counts, for each retry that passed, how long after the
	// first attempt it came.
	retryDelays delayHistogram
}

// A remoteDecider decides requests in a store shared with other daemons.
type remoteDecider interface {
	// decide decides the requests in one round trip to the store, in
	// their order, and fills in each one's result: its verdict and age,
	// or an error when the store could not answer.
	decide(reqs []remoteRequest, p Policy)
	// fallbackVerdict returns the verdict for a request the store could
	// not decide, or false to decide it locally.
	fallbackVerdict() (Verdict, bool)
}

// A remoteRequest is one request as the shared store decides it, and, once
// decided, its result.
type remoteRequest struct {
	now      uint32
	client   clientKey
	triplets []tripletKey // the recipients' before a bounce-rule one
	// bounce says that a bounce-rule recipient ended the request, and
	// malformed that a bad field did (the triplets before it are still
	// recorded, and a known client is still accepted, as locally).
	bounce, malformed bool
	badField          error // a qmail request's bad field, for a malformed verdict

	verdict Verdict // 0: malformed
	age     uint32  // the last triplet's age
	err     error   // the store could not answer
}

// rules are what a reload may change in a Greylister.
type rules struct {
	policy    Policy
	expiry    expiry
	whitelist *IPRanges
}

// NewGreylister returns a Greylister over t. now is its clock; tests pass a
// fake one.
func NewGreylister(t *table, p Policy, wl *IPRanges, now func() time.Time) *Greylister {
	g := &Greylister{table: t, now: now}
	g.SetRules(p, wl)
	return g
}

// SetRules makes the Greylister decide with policy p and whitelist wl (nil
// for none) from now on. Entries already held keep their times.
func (g *Greylister) SetRules(p Policy, wl *IPRanges) {
	if wl == nil {
		wl = &IPRanges{}
	}
	g.rules.Store(&rules{policy: p, expiry: p.expiry(), whitelist: wl})
}

// Policy returns the time limits the Greylister decides with.
func (g *Greylister) Policy() Policy { return g.rules.Load().policy }

// clock returns the current unix time in seconds as the table stores it.
func (g *Greylister) clock() uint32 {
	s := g.now().Unix()
	if s < 0 {
		return 0
	}
	return uint32(min(s, math.MaxUint32))
}

// A Client is a request's client address, parsed once.
type Client struct {
	key  clientKey
	addr netip.Addr // valid when isIP
	isIP bool
}

// ParseClient parses the client field of a request. An IP address is keyed
// by the network that grouping puts it in, and whitelisted by itself. Text
// that is not an IP address is a valid client keyed by its exact bytes; it
// never matches the whitelist.
func ParseClient(raw []byte, grouping addrGrouping) Client {
	k, addr, ok := makeClientKey(raw)
	if ok {
		if grouped := grouping.group(addr); grouped != addr {
			k = clientKeyFromAddr(grouped)
		}
	}
	return Client{key: k, addr: addr, isIP: ok}
}

// ParseClient parses a request's client as g groups addresses.
func (g *Greylister) ParseClient(raw []byte) Client { return ParseClient(raw, g.grouping) }

// ParseSender parses a request's sender, normalised if g normalises
// senders; kb holds the normalised text.
func (g *Greylister) ParseSender(kb *keyBuilder, raw []byte) Sender {
	return ParseSender(raw, g.normalize, kb)
}

// checkClient decides the request on its client alone, as steps 2 and 3 of
// PROTOCOL.md §4 do: a whitelisted client is accepted, and so is a known IP,
// whose last-seen time then moves to now. It reports false when the
// recipients must be examined.
func (g *Greylister) checkClient(c Client, now uint32) (Verdict, bool) {
	if g.whitelisted(c) {
		return AcceptWhitelisted, true
	}
	if g.table.refreshKnown(c.key, now, g.rules.Load().policy.KnownIPLifetime) {
		return AcceptKnownIP, true
	}
	return 0, false
}

// whitelisted reports whether c's address is in the whitelist.
func (g *Greylister) whitelisted(c Client) bool {
	return c.isIP && g.rules.Load().whitelist.Contains(c.addr)
}

// decideRecipient decides a request with one recipient, as the Postfix
// front end asks: in the shared store when there is one (unless the client
// is whitelisted, which stays local), else, or when the store could not
// answer and redis_fallback says so, against the local table. It returns
// the verdict and the triplet's age. kb is the caller's scratch space.
func (g *Greylister) decideRecipient(kb *keyBuilder, c Client, sender, rcpt []byte, now uint32) (Verdict, uint32) {
	if g.remote != nil {
		if g.whitelisted(c) {
			return AcceptWhitelisted, 0
		}
		kb.rcpts = append(kb.rcpts[:0], rcpt)
		if v, age, ok := g.decideRemote(kb, c, g.ParseSender(kb, sender), kb.rcpts, false, now); ok {
			return v, age
		}
	}
	if v, done := g.checkClient(c, now); done {
		return v, 0
	}
	result, age := g.checkRecipient(kb, c, g.ParseSender(kb, sender), rcpt, now)
	v, _ := combine(AcceptRetried, result)
	return v, age
}

// A recipientResult is what checkRecipient found for one recipient.
type recipientResult uint8

const (
	rcptBounce  recipientResult = iota // bounce rule: accept, examine nothing more
	rcptNew                            // new triplet recorded
	rcptTooSoon                        // retried too soon
	rcptRetryOK                        // good retry; the client is now known
	rcptStale                          // stale triplet restarted
)

// A Sender is a request's envelope sender, parsed once per request.
type Sender struct {
	text []byte // the raw text, or "." for the null sender
	null bool   // empty or "." once spaces are removed
}

var nullSender = []byte(".")

// ParseSender parses the sender text of a request. The null sender
// (MAIL FROM:<>) arrives empty; like the Perl daemon, greydaemon treats a
// sender that is empty or "." once its spaces are removed as null and keys it
// as ".". With normalize, the per-message tags of BATV, SRS and VERP are
// taken out of the key (normalizeSender), in kb's scratch space.
func ParseSender(raw []byte, normalize bool, kb *keyBuilder) Sender {
	if isNullSender(raw) {
		return Sender{text: nullSender, null: true}
	}
	if normalize {
		kb.sender = normalizeSender(kb.sender[:0], raw)
		return Sender{text: kb.sender}
	}
	return Sender{text: raw}
}

// isNullSender reports whether sender, once its spaces are removed, is empty
// or ".", which the Perl daemon treats alike.
func isNullSender(sender []byte) bool {
	seenDot := false
	for _, c := range sender {
		switch {
		case c == ' ':
		case c == '.' && !seenDot:
			seenDot = true
		default:
			return false
		}
	}
	return true
}

// looksLikeVERP reports whether rcpt contains a '-' followed later by '=',
// the Perl daemon's /-.*=/.
func looksLikeVERP(rcpt []byte) bool {
	i := bytes.IndexByte(rcpt, '-')
	return i >= 0 && bytes.IndexByte(rcpt[i+1:], '=') >= 0
}

// checkRecipient decides one recipient of a request from client c with
// sender s, as step 5 of PROTOCOL.md §4 does, and records what it must: a
// new or stale triplet, and the client as known after a good retry. It
// also returns the triplet's age in seconds (0 for a new or restarted
// one). kb is the caller's scratch space.
func (g *Greylister) checkRecipient(kb *keyBuilder, c Client, s Sender, rcpt []byte, now uint32) (recipientResult, uint32) {
	if s.null && looksLikeVERP(rcpt) {
		return rcptBounce, 0
	}
	r := g.rules.Load()
	exp := r.expiry
	k := kb.triplet(c.key, s.text, rcpt)
	state, first := g.table.observeTriplet(k, now, r.policy.MinResendDelay, r.policy.ResendWindow, exp)
	switch state {
	case greyTooSoon:
		return rcptTooSoon, age(now, first)
	case greyRetryOK:
		g.table.markKnown(c.key, now, exp)
		a := age(now, first)
		g.retryDelays.observe(a)
		return rcptRetryOK, a
	case greyStale:
		return rcptStale, 0
	default:
		return rcptNew, 0
	}
}

// combine folds one recipient's result into the verdict of a multi-recipient
// request the way the Perl daemon's loop does: the last assignment wins, a
// good retry assigns nothing, and the bounce rule ends the loop. The first
// verdict is AcceptRetried.
func combine(v Verdict, r recipientResult) (next Verdict, stop bool) {
	switch r {
	case rcptBounce:
		return AcceptBounce, true
	case rcptNew:
		return GreyNew, false
	case rcptTooSoon:
		return GreyTooSoon, false
	case rcptStale:
		return GreyStale, false
	}
	return v, false
}

// sweep runs until ctx is done, sweeping one shard of the table every
// interval/len(shards), so that each shard is swept once per interval and no
// lock is held for long. After each round over all shards it calls
// roundDone, if set, with the number of entries the round deleted.
func (g *Greylister) sweep(ctx context.Context, interval time.Duration, roundDone func(deleted int)) {
	n := len(g.table.shards)
	tick := time.NewTicker(max(interval/time.Duration(n), time.Millisecond))
	defer tick.Stop()
	deleted := 0
	for i := 0; ; i = (i + 1) % n {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			deleted += g.table.sweepShard(i, g.clock(), g.rules.Load().expiry)
		}
		if i == n-1 {
			if roundDone != nil {
				roundDone(deleted)
			}
			deleted = 0
		}
	}
}

// prepareRemote fills r with the request from client c (already not
// whitelisted) with sender s and the recipients, for the shared store;
// malformed says that a bad field followed them. kb is the caller's
// scratch space.
func (g *Greylister) prepareRemote(kb *keyBuilder, r *remoteRequest, c Client, s Sender, rcpts [][]byte, malformed bool, now uint32) {
	*r = remoteRequest{now: now, client: c.key, triplets: r.triplets[:0], malformed: malformed}
	for _, rcpt := range rcpts {
		if s.null && looksLikeVERP(rcpt) {
			r.bounce, r.malformed = true, false // the bounce rule ends the request first
			break
		}
		r.triplets = append(r.triplets, kb.triplet(c.key, s.text, rcpt))
	}
}

// finishRemote returns the result of a request the shared store decided:
// the verdict (0 for malformed; redis_fallback's when the store could not
// answer) and the last triplet's age, or false when the store could not
// answer and the fallback is to decide locally.
func (g *Greylister) finishRemote(r *remoteRequest) (Verdict, uint32, bool) {
	if r.err == nil {
		if r.verdict == AcceptRetried && len(r.triplets) > 0 {
			g.retryDelays.observe(r.age)
		}
		return r.verdict, r.age, true
	}
	v, ok := g.remote.fallbackVerdict()
	return v, 0, ok
}

// decideRemote decides one request in the shared store, as the local
// decision does; see prepareRemote and finishRemote.
func (g *Greylister) decideRemote(kb *keyBuilder, c Client, s Sender, rcpts [][]byte, malformed bool, now uint32) (Verdict, uint32, bool) {
	reqs := make([]remoteRequest, 1) // an allocation; the round trip costs far more
	g.prepareRemote(kb, &reqs[0], c, s, rcpts, malformed, now)
	g.remote.decide(reqs, g.Policy())
	return g.finishRemote(&reqs[0])
}
