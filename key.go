package main

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"unsafe"

	"github.com/zeebo/xxh3"
)

// This file is the one place where table keys are built. Every front end
// (the qmail UDP protocol today, Postfix policy delegation later) turns a
// client address into a clientKey and a triplet into a tripletKey here, so
// that prefix grouping (/24, /64) and sender normalisation (BATV, SRS) have a
// single place to go.

// Keys are byte arrays rather than pairs of uint64: with 1-byte alignment a
// map slot holding a key and a uint32 takes 20 bytes instead of 24, which is
// a sixth of the table's memory.

// A clientKey identifies a client in the known-IP table and as the first part
// of a triplet. For a client text that parses as an IP address it is the
// address's 16-byte IPv6 form (IPv4 as ::ffff:a.b.c.d), so it is exact and
// reversible. For any other text (qmail sends "unknown" when TCPREMOTEIP is
// unset) it is the 128-bit xxh3 hash of the exact bytes, with the first byte
// set to 0xfe so it can never equal an IPv4-mapped address. Such a key is not
// reversible; a hashed key equal to a real IPv6 key needs a 2^-120 accident.
type clientKey [16]byte

// A tripletKey is the 128-bit xxh3 fingerprint of a normalised
// (client, sender, recipient) triplet. The table keeps only fingerprints, never
// the text: two triplets collide with probability about n²/2^129, which for
// 10 million entries is below 10^-24, so a collision cannot in practice let a
// triplet skip greylisting. (A spammer gains nothing by forging one: retrying
// once is cheaper.) The cost is 16 bytes per entry instead of the 50 to 100
// bytes of the text.
type tripletKey [16]byte

// hashedClientMark is the top byte of a clientKey made from non-IP text.
const hashedClientMark = 0xfe

// parseClientIP parses the client field of a request as an IP address. It
// accepts what netip.ParseAddr accepts, drops an IPv6 zone, and unmaps
// IPv4-mapped IPv6 addresses, so that 2001:DB8::5 and 2001:db8::5 are one
// client and ::ffff:192.0.2.1 is 192.0.2.1. It does not allocate.
func parseClientIP(b []byte) (netip.Addr, bool) {
	if len(b) == 0 || len(b) > 64 {
		return netip.Addr{}, false
	}
	// The string shares b's memory only for the duration of the call; the
	// returned Addr holds no reference to it once the zone is dropped.
	s := unsafe.String(&b[0], len(b))
	addr, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return addr.WithZone("").Unmap(), true
}

// makeClientKey returns the key of the client whose request field is raw
// and, when raw is an IP address, that address.
func makeClientKey(raw []byte) (clientKey, netip.Addr, bool) {
	addr, ok := parseClientIP(raw)
	if ok {
		return clientKeyFromAddr(addr), addr, true
	}
	k := clientKey(xxh3.Hash128(raw).Bytes())
	k[0] = hashedClientMark
	return k, netip.Addr{}, false
}

// clientKeyFromAddr returns the key of an IP address.
func clientKeyFromAddr(addr netip.Addr) clientKey {
	return clientKey(addr.As16())
}

// addr returns the IP address that k was made from, or false when k is a
// hash of non-IP text.
func (k clientKey) addr() (netip.Addr, bool) {
	if k[0] == hashedClientMark {
		return netip.Addr{}, false
	}
	return netip.AddrFrom16(k).Unmap(), true
}

// normalizeAddress appends s to dst with every space removed and ASCII
// letters lowercased, as the Perl daemon's s/ //g and lc do on bytes.
func normalizeAddress(dst, s []byte) []byte {
	for _, c := range s {
		switch {
		case c == ' ':
		case 'A' <= c && c <= 'Z':
			dst = append(dst, c+('a'-'A'))
		default:
			dst = append(dst, c)
		}
	}
	return dst
}

// appendTripletText appends the bytes that identify a triplet to dst: the
// client key, the normalised sender, a NUL, and the normalised recipient.
// Sender and recipient never contain NUL, so the encoding is unambiguous. An
// empty sender must already have been replaced by ".".
func appendTripletText(dst []byte, client clientKey, sender, rcpt []byte) []byte {
	dst = append(dst, client[:]...)
	dst = normalizeAddress(dst, sender)
	dst = append(dst, 0)
	return normalizeAddress(dst, rcpt)
}

// A keyBuilder builds triplet keys in a buffer that it reuses, so that
// building a key does not allocate once the buffer has grown. A keyBuilder is
// owned by one goroutine.
type keyBuilder struct {
	buf    []byte
	sender []byte   // a normalised sender
	rcpts  [][]byte // a one-recipient request's recipient, for the shared store
}

// triplet returns the key of the triplet (client, sender, rcpt).
func (kb *keyBuilder) triplet(client clientKey, sender, rcpt []byte) tripletKey {
	kb.buf = appendTripletText(kb.buf[:0], client, sender, rcpt)
	return tripletKey(xxh3.Hash128(kb.buf).Bytes())
}

// shardHash returns the 64 bits of a key that pick its shard.
func (k clientKey) shardHash() uint64 {
	return mix64(binary.LittleEndian.Uint64(k[:8]) ^ binary.LittleEndian.Uint64(k[8:]))
}

// shardHash uses bits of the fingerprint itself, which are uniform.
func (k tripletKey) shardHash() uint64 { return binary.LittleEndian.Uint64(k[8:]) }

// mix64 spreads the bits of an IP-derived key, whose low bits are not random,
// over the whole word (the splitmix64 finaliser).
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// An addrGrouping maps client addresses to the network they are keyed by:
// big senders retry from another address of the same pool, and with a /24
// or a /64 such a retry still counts. The whitelist still sees the exact
// address. The zero addrGrouping keys every address by itself.
type addrGrouping struct {
	v4Bits, v6Bits int // prefix lengths; 0 means the whole address
}

// group returns the first address of the network addr belongs to.
func (a addrGrouping) group(addr netip.Addr) netip.Addr {
	bits := a.v6Bits
	if addr.Is4() {
		bits = a.v4Bits
	}
	if bits == 0 || bits >= addr.BitLen() {
		return addr
	}
	p, err := addr.Prefix(bits)
	if err != nil {
		return addr
	}
	return p.Addr()
}

// normalizeSender appends to dst the sender s with the per-message parts
// that big senders and mailing lists add taken out, so that a retry with a
// fresh tag has the key of the first attempt:
//
//   - BATV (prvs=tag=user@, msprvs1=tag=user@): the tag goes;
//   - SRS (SRS0=hash=tt=domain=local@forwarder, and SRS1 with its chain):
//     the original sender, local@domain, comes back;
//   - in what remains of the local part, every run of 3 or more decimal
//     digits, and every run of 8 or more hexadecimal digits holding at
//     least one decimal digit, becomes "#" (VERP bounce addresses, list
//     and ESP message numbers and ids).
//
// Letters are compared without regard to case; the result keeps s's case
// (the key lowercases it later). It does not allocate once dst has room.
func normalizeSender(dst, s []byte) []byte {
	at := bytes.LastIndexByte(s, '@')
	if at < 0 {
		return append(dst, s...)
	}
	local, domain := s[:at], s[at:] // domain keeps its '@'
	if l, d, ok := srsOriginal(local); ok {
		local, domain = l, d
		dst = collapseDigitRuns(dst, local)
		dst = append(dst, '@')
		return append(dst, domain...)
	}
	local = stripBATV(local)
	dst = collapseDigitRuns(dst, local)
	return append(dst, domain...)
}

// srsOriginal returns the original local part and domain of an SRS local
// part (SRS0=HHH=TT=domain=local or SRS1=HHH=forwarder=[=]HHH=TT=domain=local,
// with '=', '+' or '-' after the SRS0/SRS1 tag).
func srsOriginal(local []byte) (origLocal, origDomain []byte, ok bool) {
	if len(local) < 5 || !hasPrefixFold(local, "srs") || (local[3] != '0' && local[3] != '1') {
		return nil, nil, false
	}
	if c := local[4]; c != '=' && c != '+' && c != '-' {
		return nil, nil, false
	}
	rest := local[5:]
	if local[3] == '1' {
		// SRS1=HHH=forwarder==HHH=TT=domain=local: the original SRS0 part
		// follows the "==".
		i := bytes.Index(rest, []byte("=="))
		if i < 0 {
			return nil, nil, false
		}
		rest = rest[i+2:]
	}
	// HHH=TT=domain=local
	for range 2 {
		i := bytes.IndexByte(rest, '=')
		if i < 0 {
			return nil, nil, false
		}
		rest = rest[i+1:]
	}
	i := bytes.IndexByte(rest, '=')
	if i <= 0 || i == len(rest)-1 {
		return nil, nil, false
	}
	return rest[i+1:], rest[:i], true
}

// stripBATV returns local without a BATV tag: "prvs=TAG=user" (the
// standard form) and "prvs=user=TAG" (an early draft's) give "user", where
// TAG is a key digit, three day digits and six hex digits; "msprvs1=" is
// Microsoft's tag prefix for the same.
func stripBATV(local []byte) []byte {
	var rest []byte
	switch {
	case hasPrefixFold(local, "prvs="):
		rest = local[5:]
	case hasPrefixFold(local, "msprvs1="):
		rest = local[8:]
	default:
		return local
	}
	i := bytes.IndexByte(rest, '=')
	if i < 0 {
		return local
	}
	first, second := rest[:i], rest[i+1:]
	switch {
	case isBATVTag(first) && len(second) > 0:
		return second
	case isBATVTag(second) && len(first) > 0:
		return first
	case hasPrefixFold(local, "msprvs1=") && len(second) > 0:
		return second // Microsoft's tags are not always the standard's shape
	}
	return local
}

// isBATVTag reports whether b has the shape of a BATV prvs tag: one key
// digit, three day digits, six hex digits.
func isBATVTag(b []byte) bool {
	if len(b) != 10 {
		return false
	}
	for i, c := range b {
		switch {
		case '0' <= c && c <= '9':
		case i >= 4 && ('a' <= c|0x20 && c|0x20 <= 'f'):
		default:
			return false
		}
	}
	return true
}

// collapseDigitRuns appends local to dst with every run of 3 or more
// decimal digits, and every run of 8 or more hex digits that holds a
// decimal digit, replaced by '#'.
func collapseDigitRuns(dst, local []byte) []byte {
	for i := 0; i < len(local); {
		if !isHexDigit(local[i]) {
			dst = append(dst, local[i])
			i++
			continue
		}
		j, digits := i, 0
		for ; j < len(local) && isHexDigit(local[j]); j++ {
			if local[j] <= '9' {
				digits++
			}
		}
		if j-i >= 8 && digits > 0 {
			dst = append(dst, '#')
			i = j
			continue
		}
		// A shorter hex run (or one without digits): collapse only its
		// decimal runs.
		for k := i; k < j; {
			if local[k] > '9' {
				dst = append(dst, local[k])
				k++
				continue
			}
			m := k
			for m < j && local[m] <= '9' {
				m++
			}
			if m-k >= 3 {
				dst = append(dst, '#')
			} else {
				dst = append(dst, local[k:m]...)
			}
			k = m
		}
		i = j
	}
	return dst
}

// isHexDigit reports whether c is 0-9, a-f or A-F.
func isHexDigit(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c|0x20 && c|0x20 <= 'f'
}

// hasPrefixFold reports whether b starts with the lowercase ASCII prefix,
// ignoring case.
func hasPrefixFold(b []byte, prefix string) bool {
	if len(b) < len(prefix) {
		return false
	}
	for i := range len(prefix) {
		if b[i]|0x20 != prefix[i] {
			return false
		}
	}
	return true
}
