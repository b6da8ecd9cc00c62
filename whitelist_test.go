package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWhitelistForms(t *testing.T) {
	text := `# comment line
10.1.2.3/8        # host bits set: masked to 10.0.0.0/8, with a warning
192.0.2.7
198.51.100        # /24
172.16            # /16
100               # /8
203.0.113.128/25

2001:db8::/32
2001:db8:ffff::1
::ffff:192.168.0.0/112
`
	var warnings []string
	w, err := parseWhitelist(strings.NewReader(text), "wl", func(s string) { warnings = append(warnings, s) })
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "wl:2:") || !strings.Contains(warnings[0], "10.0.0.0/8") {
		t.Errorf("warnings %q, want one for line 2", warnings)
	}
	for addr, want := range map[string]bool{
		"10.200.1.1":          true,
		"11.0.0.1":            false,
		"192.0.2.7":           true,
		"192.0.2.8":           false,
		"198.51.100.255":      true,
		"198.51.101.0":        false,
		"172.16.99.1":         true,
		"172.17.0.1":          false,
		"100.64.0.1":          true,
		"203.0.113.200":       true,
		"203.0.113.100":       false,
		"::ffff:198.51.100.1": true,
		"2001:db8:1::1":       true,
		"2001:db9::1":         false,
		"2001:db8:ffff::1":    true,
		"2001:db8:ffff::2":    true, // inside 2001:db8::/32 too
		"::1":                 false,
		"192.168.5.5":         true,  // ::ffff:192.168.0.0/112
		"::a00:1":             false, // IPv6 ::10.0.0.1 is not IPv4 10.0.0.1
	} {
		if got := w.Contains(netip.MustParseAddr(addr)); got != want {
			t.Errorf("Contains(%s) = %v, want %v", addr, got, want)
		}
	}
	if w.Len() != 9 {
		t.Errorf("Len() = %d, want 9", w.Len())
	}
	var empty *IPRanges
	if empty.Contains(netip.MustParseAddr("10.0.0.1")) {
		t.Error("nil whitelist matched")
	}
}

func TestWhitelistErrors(t *testing.T) {
	for _, tt := range []struct{ line, want string }{
		{"256.1.1.1", "octet 256 is over 255"},
		{"1.2.3.4.5", "more than 4 octets"},
		{"1.2.3.4/33", `bad prefix length "33"`},
		{"1.2.3.4/-1", "bad prefix length"},
		{"1.2.3.4/", "bad prefix length"},
		{"1..3", "bad IPv4 address"},
		{"backup relays 1.2.3.4", "bad IPv4 address"},
		{"example.com", "bad IPv4 address"},
		{"2001:db8::/129", "bad prefix length"},
		{"2001:zz8::", "bad IPv6 address"},
		{"fe80::1%eth0", "bad IPv6 address"},
	} {
		_, err := parseWhitelist(strings.NewReader("# ok\n10.0.0.0/8\n"+tt.line+"\n"), "/etc/wl", nil)
		if err == nil || !strings.Contains(err.Error(), "/etc/wl:3: ") || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: got %v, want /etc/wl:3: ... %s", tt.line, err, tt.want)
		}
	}
}

// TestWhitelistPerlTrailingWords checks that a Perl whitelist whose lines
// carry words after the range loads, with one warning per such line, and
// that every bad line of a file is named.
func TestWhitelistPerlTrailingWords(t *testing.T) {
	var warnings []string
	w, err := parseWhitelist(strings.NewReader("198.18.0.0/15 backup relays\n10.1 office  # comment\n192.0.2.7\n"), "wl",
		func(s string) { warnings = append(warnings, s) })
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range []string{"198.19.255.1", "10.1.200.3", "192.0.2.7"} {
		if !w.Contains(netip.MustParseAddr(ip)) {
			t.Errorf("%s not whitelisted", ip)
		}
	}
	if len(warnings) != 2 || !strings.Contains(warnings[0], `wl:1: ignoring the words after 198.18.0.0/15, as the Perl daemon did: "backup relays"`) ||
		!strings.Contains(warnings[1], "wl:2:") {
		t.Errorf("warnings: %q", warnings)
	}
	_, err = parseWhitelist(strings.NewReader("relays 10.0.0.0/8\n10.0.0.0/8\n300.1.1.1 x\n"), "wl", nil)
	if err == nil || !strings.Contains(err.Error(), "wl:1: ") || !strings.Contains(err.Error(), "wl:3: ") {
		t.Errorf("got %v, want errors for lines 1 and 3", err)
	}
}

func TestLoadWhitelistMissing(t *testing.T) {
	_, err := LoadWhitelist(filepath.Join(t.TempDir(), "nope"), nil)
	if err == nil || !strings.Contains(err.Error(), "cannot open whitelist") || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("got %v", err)
	}
	path := filepath.Join(t.TempDir(), "wl")
	os.WriteFile(path, []byte("192.0.2.0/24\n"), 0o644)
	w, err := LoadWhitelist(path, nil)
	if err != nil || !w.Contains(netip.MustParseAddr("192.0.2.1")) {
		t.Fatalf("got %v, %v", w, err)
	}
}

// TestWhitelistFileErrorIsFatal checks that a bad whitelist stops the daemon
// at start with the file and line named.
func TestWhitelistFileErrorIsFatal(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wl")
	os.WriteFile(path, []byte("10.0.0.0/8\n300.1.2.3\n"), 0o644)
	cfg := defaultConfig()
	cfg.Whitelist = path
	d := newDaemon(settingsOf(t, cfg), &syncBuffer{}, &syncBuffer{})
	d.now = newFakeClock().now
	err := d.run(t.Context())
	if err == nil || !strings.Contains(err.Error(), path+":2:") {
		t.Fatalf("got %v, want an error naming %s:2", err, path)
	}
}
