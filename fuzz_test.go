package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"unicode/utf8"
)

// This file holds the fuzz targets of the parsers that had none: the
// whitelist, the config file and the decision log line. (The request
// parser, the snapshot and Perl save-file loaders and the table model are
// fuzzed beside their tests.) CI runs each for a few seconds; an input a
// run finds goes under testdata/fuzz as a regression seed.

// FuzzWhitelist parses arbitrary whitelist text: no panic; a range it
// keeps is masked and contains its own address; an error names the file
// and a line.
func FuzzWhitelist(f *testing.F) {
	f.Add("10.0.0.0/8\n192.0.2.7\n198.51.100 relays # comment\n2001:db8::/32\n")
	f.Add("10.1.2.3/8\n::ffff:192.168.0.0/112\n")
	f.Add("300.1.1.1\n1.2.3.4/33\nfe80::1%eth0\n")
	f.Fuzz(func(t *testing.T, text string) {
		w, err := parseWhitelist(strings.NewReader(text), "wl", func(string) {})
		if err != nil {
			if !strings.HasPrefix(err.Error(), "wl:") && !strings.HasPrefix(err.Error(), "cannot read wl") {
				t.Fatalf("error does not name the file and line: %v", err)
			}
			return
		}
		for p := range w.ranges {
			if p != p.Masked() || !w.Contains(p.Addr()) {
				t.Fatalf("range %v is not masked or does not contain its address", p)
			}
		}
	})
}

// FuzzConfig decodes arbitrary TOML over the defaults: no panic; settings
// that pass every check resolve to limits a retry can meet.
func FuzzConfig(f *testing.F) {
	f.Add(`listen = "127.0.0.1:1999"` + "\nmin_resend_delay = \"5m\"\nresend_window = \"12h\"\n")
	f.Add(`allow = ["127.0.0.0/8", "::1/128"]` + "\nmetrics_listen = \"127.0.0.1:9119\"\nmax_entries = 1000\n")
	f.Add("known_ip_lifetime = \"1.5d\"\nsave_interval = \"1s\"\nbogus = 1\n")
	f.Fuzz(func(t *testing.T, text string) {
		c := defaultConfig()
		if err := parseConfig(&c, strings.NewReader(text), "f.toml"); err != nil {
			if !strings.HasPrefix(err.Error(), "f.toml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		set, err := resolve(c, Source{File: "f.toml", FileText: []byte(text)})
		if err != nil {
			return
		}
		p := set.Policy
		if p.MinResendDelay == 0 || p.MinResendDelay >= p.ResendWindow || p.KnownIPLifetime == 0 || set.ListenAddr == "" {
			t.Fatalf("settings resolved to an impossible policy %+v (listen %q)", p, set.ListenAddr)
		}
	})
}

// FuzzLogLine formats arbitrary requests as decision lines: each is one
// line of valid UTF-8 without control bytes, bounded in length whatever
// the request.
func FuzzLogLine(f *testing.F) {
	f.Add(req("192.0.2.1", alice, bob))
	f.Add([]byte("I1.2.3.4\x00Fa@b\r\n192.0.2.9:1 retry ok\x1b[2J\xc2\x9b\xff"))
	f.Fuzz(func(t *testing.T, request []byte) {
		line := appendLogLine(nil, netip.MustParseAddrPort("[2001:db8::1]:25"), "new grey", request)
		if bytes.IndexByte(line, '\n') != len(line)-1 {
			t.Fatalf("not exactly one line: %q", line)
		}
		if !utf8.Valid(line) {
			t.Fatalf("not valid UTF-8: %q", line)
		}
		for _, r := range string(line[:len(line)-1]) {
			if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
				t.Fatalf("control character %U in %q", r, line)
			}
		}
		if len(line) > 4*maxLoggedRequest+100 {
			t.Fatalf("a %d-byte request made a %d-byte line", len(request), len(line))
		}
		if !bytes.HasPrefix(line, []byte("2001:db8::1:25 new grey ")) {
			t.Fatalf("line does not start with the peer and event: %q", line)
		}
	})
}
