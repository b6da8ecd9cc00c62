package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// This file tests the subcommands: check, lookup, version and help.

// runCommand runs greydaemon's command line and returns its exit code,
// stdout and stderr, as main would.
func runCommand(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	err := run(args, &out, &errOut, nil)
	code = exitCode(err, &out, &errOut)
	return code, out.String(), errOut.String()
}

// writeStateFile writes a snapshot to path holding what a Greylister
// recorded from the requests, each sent at its offset from the clock's
// start; it returns the clock as it was after the last.
func writeStateFile(t *testing.T, path string, requests map[time.Duration][]byte) *fakeClock {
	t.Helper()
	clock := newFakeClock()
	start := clock.now()
	snap := newTestSnapshotter(t, path, clock)
	g := NewGreylister(snap.table, testPolicy, nil, clock.now)
	var kb keyBuilder
	for offset := time.Duration(0); offset <= 24*time.Hour; offset += time.Second {
		if d, ok := requests[offset]; ok {
			clock.unix.Store(start.Add(offset).Unix())
			if _, err := g.decideQmail(&kb, d); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := snap.save(); err != nil {
		t.Fatal(err)
	}
	return clock
}

func TestCheckGood(t *testing.T) {
	dir := t.TempDir()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("10.0.0.0/8\n198.18.0.0/15 backup relays\n"), 0o644)
	writeStateFile(t, filepath.Join(dir, "state"), map[time.Duration][]byte{0: req("192.0.2.1", alice, bob)})
	conf := writeConfig(t, dir, fmt.Sprintf("whitelist = %q", wl), `allow = ["127.0.0.0/8"]`)
	code, out, errOut := runCommand("check", "-c", conf)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, errOut)
	}
	for _, want := range []string{"settings OK from " + conf, "whitelist " + wl + " (2 ranges)", "(msgpack, 0 known IPs, 1 grey triplets)"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(errOut, "warning: "+wl+":2: ignoring the words after") {
		t.Errorf("no warning for the trailing words:\n%s", errOut)
	}
	// The Perl command line, with a state file not there yet.
	if code, out, errOut := runCommand("check", "-m", "1", "127.0.0.1:2000", filepath.Join(dir, "new")); code != 0 || !strings.Contains(out, "no state file") {
		t.Errorf("exit %d\n%s%s", code, out, errOut)
	}
}

func TestCheckBad(t *testing.T) {
	dir := t.TempDir()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("10.0.0.0/8\n300.1.2.3\nrelays 10.0.0.0/8\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "state"), []byte("greydaemon-snapshot but not really\n\x00\x01"), 0o644)
	conf := writeConfig(t, dir, fmt.Sprintf("whitelist = %q", wl), `resend_widow = "6h"`, `min_resend_delay = "13h"`, `allow = ["10.0.0.1/8"]`)
	code, out, errOut := runCommand("check", "-c", conf)
	if code != 1 || out != "" {
		t.Fatalf("exit %d, stdout %q; want 1 and nothing", code, out)
	}
	for _, want := range []string{
		conf + ":4: unknown key resend_widow",
		conf + ":5: min_resend_delay: must be below resend_window",
		conf + ":6: allow: \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)",
		wl + ":2: bad IPv4 address",
		wl + ":3: bad IPv4 address",
		"state file " + fmt.Sprintf("%q", filepath.Join(dir, "state")),
		"check found 6 problem(s)",
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("output lacks %q:\n%s", want, errOut)
		}
	}
	// With the unknown key gone, the values are checked, each at its line.
	conf = writeConfig(t, dir, `min_resend_delay = "13h"`, `allow = ["10.0.0.1/8"]`, `save_interval = "0s"`)
	code, _, errOut = runCommand("check", "-c", conf, "-g", "2")
	for _, want := range []string{
		conf + ":3: min_resend_delay: must be below resend_window (2h0m0s)",
		conf + ":4: allow: \"10.0.0.1/8\" has host bits set",
		conf + ":5: save_interval: must be positive",
	} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Errorf("exit %d, output lacks %q:\n%s", code, want, errOut)
		}
	}
	if code, _, errOut := runCommand("check", "-c", filepath.Join(dir, "missing.toml")); code != 1 || !strings.Contains(errOut, "cannot open config") {
		t.Errorf("missing config: exit %d\n%s", code, errOut)
	}
	if code, _, errOut := runCommand("check", "-x"); code != 2 || !strings.Contains(errOut, "usage:") {
		t.Errorf("bad flag: exit %d\n%s", code, errOut)
	}
}

func TestLookup(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	clock := writeStateFile(t, path, map[time.Duration][]byte{
		0:                req("192.0.2.1", alice, bob),   // retried below: known
		10 * time.Minute: req("192.0.2.1", alice, bob),   // good retry
		20 * time.Minute: req("192.0.2.2", alice, bob),   // grey, 8 minutes before the save
		28 * time.Minute: req("192.0.2.3", alice, carol), // grey, at the save
	})
	now := clock.now()
	lookup := func(args ...string) string {
		t.Helper()
		var out bytes.Buffer
		if err := lookupCommand(args, &out, func() time.Time { return now }); err != nil {
			t.Fatalf("lookup %q: %v", args, err)
		}
		return out.String()
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{path, "192.0.2.1"}, `client 192.0.2.1: known IP, last seen .* \(18m0s ago\): accepted \(01 02\) until .* \(in 167h42m0s\)`},
		{[]string{path, "192.0.2.2"}, `client 192.0.2.2: not a known IP`},
		{[]string{path, "192.0.2.2", alice, bob}, `first seen .* \(8m0s ago\); a retry now passes \(01 03\) and makes the client a known IP, until .* \(in 11h52m0s\)`},
		{[]string{path, "192.0.2.3", "Alice@Sender.Example", "carol@rcpt.example"}, `first seen .* \(now\); a retry now is too soon \(00 02\); it passes from .* \(in 5m0s\)`},
		{[]string{path, "192.0.2.3", alice, bob}, `not seen; the next attempt is greylisted \(00 01\), and a retry from 5m0s later passes`},
		{[]string{path, "192.0.2.9", "", "list-return-1-x=y@lists.example"}, `accepted by the bounce rule \(01 04\)`},
	} {
		if got := lookup(tt.args...); !regexp.MustCompile(tt.want).MatchString(got) {
			t.Errorf("lookup %q:\n%s\nwant match for %s", tt.args, got, tt.want)
		}
	}
	now = now.Add(13 * time.Hour)
	if got := lookup(path, "192.0.2.2", alice, bob); !strings.Contains(got, "so the next attempt starts over (00 03)") {
		t.Errorf("after the window:\n%s", got)
	}

	// With -c: the config's state file, limits and whitelist.
	now = clock.now()
	wl := filepath.Join(dir, "whitelist")
	os.WriteFile(wl, []byte("192.0.2.0/24\n"), 0o644)
	conf := writeConfig(t, dir, `min_resend_delay = "15m"`)
	if got := lookup("-c", conf, "192.0.2.2", alice, bob); !strings.Contains(got, "a retry now is too soon (00 02)") {
		t.Errorf("with a 15m delay from the config:\n%s", got)
	}
	conf = writeConfig(t, dir, fmt.Sprintf("whitelist = %q", wl))
	if got := lookup("-c", conf, "192.0.2.200"); !strings.Contains(got, "whitelisted in "+wl+": accepted (01 01)") {
		t.Errorf("whitelisted client:\n%s", got)
	}

	var out bytes.Buffer
	for _, args := range [][]string{{}, {path, "a", "b", "c", "d"}, {"-c"}} {
		if err := lookupCommand(args, &out, time.Now); !errors.Is(err, errUsage) {
			t.Errorf("lookup %q: %v, want a usage error", args, err)
		}
	}
	os.WriteFile(filepath.Join(dir, "bad"), []byte("junk\n"), 0o644)
	if err := lookupCommand([]string{filepath.Join(dir, "bad"), "192.0.2.1"}, &out, time.Now); err == nil || !strings.Contains(err.Error(), "bad") {
		t.Errorf("lookup in a damaged file: %v", err)
	}
}

func TestVersionAndHelp(t *testing.T) {
	code, out, _ := runCommand("version")
	if code != 0 || !regexp.MustCompile(`^greydaemon \S+ \(revision \S+.*, go1\.\d+`).MatchString(out) {
		t.Errorf("version: exit %d, %q", code, out)
	}
	for _, args := range [][]string{{"-h"}, {"help"}, {"-d", "-h"}} {
		code, out, _ := runCommand(args...)
		if code != 0 || !strings.Contains(out, "greydaemon check") || !strings.Contains(out, "greydaemon lookup") || !strings.Contains(out, "-w file") {
			t.Errorf("%q: exit %d, %q", args, code, out)
		}
	}
	if code, _, errOut := runCommand("-q"); code != 2 || !strings.Contains(errOut, "flag provided but not defined: -q") {
		t.Errorf("-q: exit %d, %q", code, errOut)
	}
}

func TestVerdictIndex(t *testing.T) {
	for i, v := range verdicts {
		if v.index() != i {
			t.Errorf("%04x.index() = %d, want %d", uint16(v), v.index(), i)
		}
	}
}

// TestCheckAsTheDaemonWould checks what check finds as the daemon would
// find it at start: a state directory the -u user cannot write (checked as
// that user, although check runs as root), a socket in a directory that
// does not exist, each reported, all at once; and a summary naming every
// front end and the store.
func TestCheckAsTheDaemonWould(t *testing.T) {
	rootDir, _, _ := nobodyDir(t, false) // nobody may not write it
	conf := writeConfig(t, rootDir, `user = "nobody"`,
		fmt.Sprintf("greylistd_listen = %q", filepath.Join(rootDir, "missing", "greylistd.sock")),
		`policy_listen = "127.0.0.1:10023"`, `metrics_listen = "127.0.0.1:9119"`,
		`redis_url = "redis://:secret@127.0.0.1:6379/0"`)
	code, _, errOut := runCommand("check", "-c", conf)
	for _, want := range []string{
		fmt.Sprintf(`cannot create files in %q, the directory of state file %q, as user nobody (uid 65534)`, rootDir, filepath.Join(rootDir, "state")),
		fmt.Sprintf(`%s:4: greylistd_listen: the directory of socket %q`, conf, filepath.Join(rootDir, "missing", "greylistd.sock")),
		"check found 2 problem(s)",
	} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Errorf("exit %d; output lacks %q:\n%s", code, want, errOut)
		}
	}
	ownDir, _, _ := nobodyDir(t, true)
	conf = writeConfig(t, ownDir, `user = "nobody"`, fmt.Sprintf("greylistd_listen = %q", filepath.Join(ownDir, "greylistd.sock")),
		`policy_listen = "127.0.0.1:10023"`, `metrics_listen = "127.0.0.1:9119"`,
		`redis_url = "redis://:secret@127.0.0.1:6379/0"`)
	code, out, errOut := runCommand("check", "-c", conf)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, errOut)
	}
	for _, want := range []string{"postfix policy 127.0.0.1:10023 (at most 256 connections)", "greylistd socket " + filepath.Join(ownDir, "greylistd.sock") + " (mode 0660)",
		"metrics http://127.0.0.1:9119/metrics", "redis redis://:xxxxx@127.0.0.1:6379/0 (fallback local)"} {
		if !strings.Contains(out, want) {
			t.Errorf("summary lacks %q:\n%s", want, out)
		}
	}
}

// TestCheckReportsEveryBadValue gives two values of the wrong type: both
// are reported, each at its line.
func TestCheckReportsEveryBadValue(t *testing.T) {
	dir := t.TempDir()
	conf := writeConfig(t, dir, `min_resend_delay = "5x"`, `max_entries = "many"`)
	code, _, errOut := runCommand("check", "-c", conf)
	for _, want := range []string{conf + `:3: min_resend_delay: invalid duration "5x"`, conf + ":4: max_entries: incompatible types", "check found 2 problem(s)"} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Errorf("exit %d; output lacks %q:\n%s", code, want, errOut)
		}
	}
}

// TestCheckRedis checks `check -redis`: a Redis that answers is in the
// summary; one that does not is a problem; settings without Redis are
// one too.
func TestCheckRedis(t *testing.T) {
	port, _ := startRedis(t, 0)
	dir := t.TempDir()
	conf := writeConfig(t, dir, fmt.Sprintf("redis_url = \"redis://127.0.0.1:%d/0\"", port))
	if code, out, errOut := runCommand("check", "-redis", "-c", conf); code != 0 || !strings.Contains(out, "redis answers PING") {
		t.Errorf("a Redis that answers: exit %d, %q %q", code, out, errOut)
	}
	down := writeConfig(t, dir, fmt.Sprintf("redis_url = \"redis://127.0.0.1:%d/0\"", freeTCPPort(t)))
	if code, _, errOut := runCommand("check", "-redis", "-c", down); code != 1 || !strings.Contains(errOut, "redis: cannot reach it") {
		t.Errorf("no Redis there: exit %d, %q", code, errOut)
	}
	none := writeConfig(t, dir)
	if code, _, errOut := runCommand("check", "-redis", "-c", none); code != 1 || !strings.Contains(errOut, "the settings name no Redis") {
		t.Errorf("no Redis in the settings: exit %d, %q", code, errOut)
	}
}
