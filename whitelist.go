package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
)

// IPRanges is a set of IP ranges: the whitelist (clients never greylisted)
// and the allow list (clients answered). The zero IPRanges is empty, and so
// is a nil one. An IPRanges does not change once built, so it is safe for
// concurrent use.
type IPRanges struct {
	// ranges holds the masked prefixes; bits4 and bits6 list the prefix
	// lengths present per address family, longest first, so a lookup
	// costs one map probe per distinct length.
	ranges       map[netip.Prefix]struct{}
	bits4, bits6 []int
}

// Len returns the number of distinct ranges in w.
func (w *IPRanges) Len() int {
	if w == nil {
		return 0
	}
	return len(w.ranges)
}

// Contains reports whether addr lies in one of w's ranges. It does not
// allocate.
func (w *IPRanges) Contains(addr netip.Addr) bool {
	if w == nil || len(w.ranges) == 0 || !addr.IsValid() {
		return false
	}
	addr = addr.Unmap()
	bits := w.bits6
	if addr.Is4() {
		bits = w.bits4
	}
	for _, b := range bits {
		p, err := addr.Prefix(b)
		if err != nil {
			continue
		}
		if _, ok := w.ranges[p]; ok {
			return true
		}
	}
	return false
}

// add adds the masked prefix p to w.
func (w *IPRanges) add(p netip.Prefix) {
	if w.ranges == nil {
		w.ranges = make(map[netip.Prefix]struct{})
	}
	if _, dup := w.ranges[p]; dup {
		return
	}
	w.ranges[p] = struct{}{}
	list := &w.bits6
	if p.Addr().Is4() {
		list = &w.bits4
	}
	if !slices.Contains(*list, p.Bits()) {
		*list = append(*list, p.Bits())
		slices.Sort(*list)
		slices.Reverse(*list) // longest first
	}
}

// LoadWhitelist reads the whitelist file at path. Warnings (ranges with host
// bits set, which are masked) go to warn.
func LoadWhitelist(path string, warn func(string)) (*IPRanges, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cannot open whitelist: %w", err)
	}
	defer f.Close()
	return parseWhitelist(f, path, warn)
}

// maxWhitelistErrors bounds how many bad lines one error reports.
const maxWhitelistErrors = 20

// parseWhitelist reads a whitelist: one range per line, '#' starting a
// comment, blank lines skipped. Ranges are CIDR (a.b.c.d/bits, IPv6/bits),
// single addresses, or the Perl daemon's shortened IPv4 forms a.b.c (/24),
// a.b (/16) and a (/8). Like the Perl daemon it reads the range at the start
// of a line and ignores words after it ("198.18.0.0/15 backup relays"),
// with a warning. name is used in errors and warnings; the error names every
// bad line (up to maxWhitelistErrors).
func parseWhitelist(r io.Reader, name string, warn func(string)) (*IPRanges, error) {
	w := &IPRanges{}
	var errs []error
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 1<<20)
	for line := 1; sc.Scan(); line++ {
		text, _, _ := strings.Cut(sc.Text(), "#")
		words := strings.Fields(text)
		if len(words) == 0 {
			continue
		}
		p, masked, err := parseRange(words[0])
		if err != nil {
			if len(errs) < maxWhitelistErrors {
				errs = append(errs, fmt.Errorf("%s:%d: %w", name, line, err))
			}
			continue
		}
		if warn != nil {
			if masked {
				warn(fmt.Sprintf("%s:%d: %q has host bits set; using %s", name, line, words[0], p))
			}
			if len(words) > 1 {
				warn(fmt.Sprintf("%s:%d: ignoring the words after %s, as the Perl daemon did: %q",
					name, line, words[0], strings.Join(words[1:], " ")))
			}
		}
		w.add(p)
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("cannot read %s: %w", name, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return w, nil
}

// parseRange parses one whitelist range. It reports whether host bits were
// set and masked.
func parseRange(s string) (p netip.Prefix, masked bool, err error) {
	addrText, bitsText, hasBits := strings.Cut(s, "/")
	var addr netip.Addr
	var defBits int
	if strings.Contains(addrText, ":") {
		addr, err = netip.ParseAddr(addrText)
		if err != nil || addr.Zone() != "" {
			return p, false, fmt.Errorf("bad IPv6 address %q", addrText)
		}
		defBits = addr.BitLen()
	} else {
		addr, defBits, err = parseShortIPv4(addrText)
		if err != nil {
			return p, false, err
		}
	}
	bits := defBits
	if hasBits {
		bits, err = strconv.Atoi(bitsText)
		if err != nil || bits < 0 || bits > addr.BitLen() || bitsText[0] == '+' {
			return p, false, fmt.Errorf("bad prefix length %q in %q (want 0 to %d)", bitsText, s, addr.BitLen())
		}
	}
	if addr.Is4In6() {
		// Clients are matched unmapped: ::ffff:a.b.c.d/n is IPv4 /n-96.
		if bits < 96 {
			return p, false, fmt.Errorf("prefix %q is shorter than ::ffff:0:0/96", s)
		}
		addr, bits = addr.Unmap(), bits-96
	}
	p = netip.PrefixFrom(addr, bits)
	m := p.Masked()
	return m, m.Addr() != addr, nil
}

// parseShortIPv4 parses a dotted IPv4 address of one to four octets; the
// missing octets are 0 and the default prefix length is 8 per octet given.
func parseShortIPv4(s string) (netip.Addr, int, error) {
	var b [4]byte
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, 0, fmt.Errorf("bad IPv4 address %q: more than 4 octets", s)
	}
	for i, part := range parts {
		if part == "" || len(part) > 3 || strings.Trim(part, "0123456789") != "" {
			return netip.Addr{}, 0, fmt.Errorf("bad IPv4 address %q", s)
		}
		n, _ := strconv.Atoi(part)
		if n > 255 {
			return netip.Addr{}, 0, fmt.Errorf("bad IPv4 address %q: octet %d is over 255", s, n)
		}
		b[i] = byte(n)
	}
	return netip.AddrFrom4(b), 8 * len(parts), nil
}
