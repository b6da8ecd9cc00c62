package main

import (
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
	buf []byte
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
