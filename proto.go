package main

import (
	"bytes"
	"errors"
)

// This file is the qmail greylisting wire protocol (PROTOCOL.md §2-§4): one
// request datagram
//
//	'I' <client-ip> NUL 'F' <sender> NUL { 'T' <recipient> NUL }
//
// and a 2-byte reply. Malformed requests get no reply at all.

// maxRequestSize is the largest request accepted: a UDP datagram's limit.
const maxRequestSize = 65535

// The reasons a request is malformed. Their texts are the Perl daemon's log
// events.
var (
	errNoI = errors.New("bad req no I") // first field does not start with 'I'
	errNoF = errors.New("bad req no F") // second field missing or not 'F'
	errNoT = errors.New("bad req no T") // a later field does not start with 'T'
)

// A request is a parsed request datagram. Its slices point into the
// datagram, which must not change while the request is in use.
type request struct {
	client []byte // the client IP text, without its 'I'
	rest   []byte // the fields after the first, trailing NULs removed
}

// parseRequest splits off the first field of a datagram and checks that it
// is a client field. It does not look further: the client alone may decide
// the request (PROTOCOL.md §4 steps 2-3), even when later fields are bad.
// Trailing NULs are ignored, so datagrams with one, two or no final NUL are
// alike.
func parseRequest(b []byte) (request, error) {
	b = bytes.TrimRight(b, "\x00")
	first, rest, _ := bytes.Cut(b, []byte{0})
	if len(first) == 0 || first[0] != 'I' {
		return request{}, errNoI
	}
	return request{client: first[1:], rest: rest}, nil
}

// sender returns the sender field's text, without its 'F', and the fields
// that follow it.
func (r request) sender() (sender, rcpts []byte, err error) {
	field, rcpts, _ := bytes.Cut(r.rest, []byte{0})
	if len(field) == 0 || field[0] != 'F' {
		return nil, nil, errNoF
	}
	return field[1:], rcpts, nil
}

// nextRecipient splits the first recipient field off fields and returns its
// text without the 'T'. It returns ok == false when fields is empty.
func nextRecipient(fields []byte) (rcpt, rest []byte, ok bool, err error) {
	if len(fields) == 0 {
		return nil, nil, false, nil
	}
	field, rest, _ := bytes.Cut(fields, []byte{0})
	if len(field) == 0 || field[0] != 'T' {
		return nil, nil, false, errNoT
	}
	return field[1:], rest, true, nil
}

// decideQmail decides one qmail request datagram, records what the decision
// records, and returns the verdict. It returns an error (one of errNoI,
// errNoF, errNoT) for a malformed request, which must get no reply; triplets
// recorded for recipients before a bad field stay recorded, as in the Perl
// daemon. kb is the caller's scratch space.
func (g *Greylister) decideQmail(kb *keyBuilder, datagram []byte) (Verdict, error) {
	if g.remote != nil {
		reqs := make([]remoteRequest, 1) // an allocation; the round trip costs far more
		if v, pending, err := g.prepareQmailRemote(kb, &reqs[0], datagram); !pending {
			return v, err
		}
		g.remote.decide(reqs, g.Policy())
		return g.finishQmailRemote(kb, &reqs[0], datagram)
	}
	req, err := parseRequest(datagram)
	if err != nil {
		return 0, err
	}
	return g.decideQmailLocal(kb, g.ParseClient(req.client), req, g.clock())
}

// decideQmailLocal decides a parsed qmail request from client against the
// local table.
func (g *Greylister) decideQmailLocal(kb *keyBuilder, client Client, req request, now uint32) (Verdict, error) {
	if v, done := g.checkClient(client, now); done {
		return v, nil
	}
	senderText, fields, err := req.sender()
	if err != nil {
		return 0, err
	}
	sender := g.ParseSender(kb, senderText)
	v := AcceptRetried
	for {
		rcpt, rest, ok, err := nextRecipient(fields)
		if err != nil {
			return 0, err
		}
		if !ok {
			return v, nil
		}
		var stop bool
		result, _ := g.checkRecipient(kb, client, sender, rcpt, now)
		v, stop = combine(v, result)
		if stop {
			return v, nil
		}
		fields = rest
	}
}

// appendReply appends the 2-byte reply for v to dst.
func appendReply(dst []byte, v Verdict) []byte {
	return append(dst, byte(v>>8), byte(v))
}

// prepareQmailRemote readies a qmail request datagram for the shared store
// (Redis, redis.go) in r. It reports pending == false, with the verdict or
// the error that decideQmail returns, for a request decided without the
// store: a malformed client field or a whitelisted client. Once the store
// has decided r, finishQmailRemote gives the result.
func (g *Greylister) prepareQmailRemote(kb *keyBuilder, r *remoteRequest, datagram []byte) (v Verdict, pending bool, err error) {
	req, err := parseRequest(datagram)
	if err != nil {
		return 0, false, err
	}
	client := g.ParseClient(req.client)
	if g.whitelisted(client) {
		return AcceptWhitelisted, false, nil
	}
	var bad error
	senderText, fields, err := req.sender()
	if err != nil {
		bad = err
	}
	kb.rcpts = kb.rcpts[:0]
	for bad == nil {
		rcpt, rest, ok, err := nextRecipient(fields)
		if err != nil {
			bad = err
		}
		if !ok {
			break
		}
		kb.rcpts = append(kb.rcpts, rcpt)
		fields = rest
	}
	g.prepareRemote(kb, r, client, g.ParseSender(kb, senderText), kb.rcpts, bad != nil, g.clock())
	r.badField = bad
	return 0, true, nil
}

// finishQmailRemote returns what decideQmail returns for datagram, which
// prepareQmailRemote readied in r and the store has decided. When the store
// could not answer and redis_fallback says so, it decides the request
// against the local table.
func (g *Greylister) finishQmailRemote(kb *keyBuilder, r *remoteRequest, datagram []byte) (Verdict, error) {
	v, _, ok := g.finishRemote(r)
	if !ok {
		req, _ := parseRequest(datagram) // parsed before
		return g.decideQmailLocal(kb, g.ParseClient(req.client), req, r.now)
	}
	if v == 0 {
		return 0, r.badField
	}
	return v, nil
}
