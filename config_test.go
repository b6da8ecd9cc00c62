package main

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseConfigEveryKey(t *testing.T) {
	text := `
listen = "0.0.0.0:2000"
state_file = "/var/lib/greydaemon/state"
user = "greyd"
whitelist = "/etc/greydaemon/whitelist"
save_interval = "2m"
known_ip_lifetime = "1.5d"
resend_window = "6h"
min_resend_delay = "90s"
debug = true
max_entries = 500000
allow = ["127.0.0.0/8", "::1/128"]
metrics_listen = "127.0.0.1:9119"
ipv4_prefix = 24
ipv6_prefix = 48
normalize_sender = true
policy_listen = "unix:/run/greydaemon/policy.sock"
policy_socket_mode = "0666"
policy_defer_text = "Greylisted for %s s at %r"
policy_prepend_header = false
policy_max_connections = 50
policy_idle_timeout = "1m"
greylistd_listen = "/run/greydaemon/greylistd.sock"
greylistd_socket_mode = "0666"
greylistd_retry_min = "5m"
greylistd_retry_max = "4h"
greylistd_expire = "30d"
milter_listen = "unix:/run/greydaemon/milter.sock"
milter_socket_mode = "0600"
milter_socket_group = "smmsp"
milter_max_connections = 20
milter_idle_timeout = "30m"
milter_add_header = false
milter_delayed_reject = true
redis_sentinels = ["127.0.0.1:26379"]
redis_master = "mymaster"
redis_prefix = "gd:"
redis_timeout = "100ms"
redis_fallback = "tempfail"
`
	c := defaultConfig()
	if err := parseConfig(&c, strings.NewReader(text), "test.toml"); err != nil {
		t.Fatal(err)
	}
	want := Config{
		Listen: "0.0.0.0:2000", StateFile: "/var/lib/greydaemon/state", User: "greyd",
		Whitelist: "/etc/greydaemon/whitelist", SaveInterval: Duration{2 * time.Minute},
		KnownIPLifetime: Duration{36 * time.Hour}, ResendWindow: Duration{6 * time.Hour},
		MinResendDelay: Duration{90 * time.Second}, Debug: true, MaxEntries: 500000,
		Allow: []string{"127.0.0.0/8", "::1/128"}, MetricsListen: "127.0.0.1:9119",
		IPv4Prefix: 24, IPv6Prefix: 48, NormalizeSender: true,
		PolicyListen: "unix:/run/greydaemon/policy.sock", PolicySocketMode: "0666",
		PolicyDeferText: "Greylisted for %s s at %r", PolicyPrependHeader: false,
		PolicyMaxConnections: 50, PolicyIdleTimeout: Duration{time.Minute},
		GreylistdListen: "/run/greydaemon/greylistd.sock", GreylistdSocketMode: "0666",
		GreylistdRetryMin: Duration{5 * time.Minute}, GreylistdRetryMax: Duration{4 * time.Hour},
		GreylistdExpire: Duration{30 * 24 * time.Hour},
		MilterListen:    "unix:/run/greydaemon/milter.sock", MilterSocketMode: "0600", MilterGroup: "smmsp",
		MilterMaxConnections: 20, MilterIdleTimeout: Duration{30 * time.Minute}, MilterAddHeader: false,
		MilterDelayedReject: true,
		RedisSentinels:      []string{"127.0.0.1:26379"}, RedisMaster: "mymaster", RedisPrefix: "gd:",
		RedisTimeout: Duration{100 * time.Millisecond}, RedisFallback: "tempfail",
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("got %+v\nwant %+v", c, want)
	}
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tt := range []struct{ text, want string }{
		{`listen = "x"` + "\nbogus = 1\n", "test.toml:2: unknown key bogus"},
		{`resend_widow = "6h"`, "unknown key resend_widow"},
		{`min_resend_delay = "5 minutes"`, `invalid duration "5 minutes"`},
		{`known_ip_lifetime = "xd"`, `invalid duration "xd"`},
		{`max_entries = "many"`, "test.toml"},
		{`debug = "yes"`, "test.toml"},
		{"listen = \n", "test.toml:1:"},
	} {
		c := defaultConfig()
		err := parseConfig(&c, strings.NewReader(tt.text), "test.toml")
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: got %v, want an error containing %q", tt.text, err, tt.want)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tt := range []struct {
		change func(*Config)
		want   string
	}{
		{func(c *Config) { c.MinResendDelay.Duration = 12 * time.Hour }, "min_resend_delay: must be below resend_window"},
		{func(c *Config) { c.ResendWindow.Duration = 0 }, "resend_window: must be positive"},
		{func(c *Config) { c.KnownIPLifetime.Duration = -time.Hour }, "known_ip_lifetime: must be positive"},
		{func(c *Config) { c.SaveInterval.Duration = time.Millisecond }, "save_interval: must be at least 1s"},
		{func(c *Config) { c.MaxEntries = 10 }, "max_entries: must be at least 1000"},
		{func(c *Config) { c.Listen = "1.2.3.4:99999" }, "listen: bad port"},
		{func(c *Config) { c.StateFile = "" }, "state_file: must not be empty"},
		{func(c *Config) { c.IPv4Prefix = 33 }, "ipv4_prefix: must be 8 to 32"},
		{func(c *Config) { c.IPv6Prefix = 8 }, "ipv6_prefix: must be 16 to 128"},
		{func(c *Config) { c.PolicyListen = "unix:" }, `policy_listen: want "unix:/path/to/socket"`},
		{func(c *Config) { c.PolicyListen = "nowhere" }, `policy_listen: want "host:port" or "unix:/path"`},
		{func(c *Config) { c.PolicySocketMode = "rw-rw----" }, "policy_socket_mode: want an octal mode"},
		{func(c *Config) { c.PolicyDeferText = "Wait %d seconds" }, `policy_defer_text: unknown placeholder "%d"`},
		{func(c *Config) { c.PolicyDeferText = "100%" }, `policy_defer_text: ends in a lone "%"`},
		{func(c *Config) { c.PolicyDeferText = "line\nbreak" }, "policy_defer_text: must not hold control characters"},
		{func(c *Config) { c.PolicyMaxConnections = 0 }, "policy_max_connections: must be 1 to 100000"},
		{func(c *Config) { c.PolicyIdleTimeout.Duration = time.Millisecond }, "policy_idle_timeout: must be at least 1s"},
		{func(c *Config) { c.MilterListen = "unix:" }, `milter_listen: want "unix:/path/to/socket"`},
		{func(c *Config) { c.MilterListen = "127.0.0.1:70000" }, `milter_listen: bad port "70000"`},
		{func(c *Config) { c.MilterSocketMode = "0999" }, "milter_socket_mode: want an octal mode"},
		{func(c *Config) { c.MilterMaxConnections = 100_001 }, "milter_max_connections: must be 1 to 100000"},
		{func(c *Config) { c.MilterIdleTimeout.Duration = 0 }, "milter_idle_timeout: must be at least 1s"},
		{func(c *Config) { c.Allow = []string{"10.0.0.1/8"} }, "allow: \"10.0.0.1/8\" has host bits set"},
		{func(c *Config) { c.MetricsListen = "localhost" }, "metrics_listen: want host:port"},
		{func(c *Config) { c.RedisURL = "localhost:6379" }, "redis_url: want redis://"},
		{func(c *Config) { c.RedisURL, c.RedisSentinels = "redis://x:1", []string{"y:2"} }, "not both"},
		{func(c *Config) { c.RedisSentinels = []string{"y:2"} }, "redis_master: must name the master"},
		{func(c *Config) { c.RedisTimeout.Duration = 5 * time.Second }, "redis_timeout: must be 1ms to 3s"},
		{func(c *Config) { c.RedisFallback = "drop" }, "redis_fallback: must be"},
	} {
		c := defaultConfig()
		tt.change(&c)
		err := c.validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("got %v, want an error containing %q", err, tt.want)
		}
	}
	c := defaultConfig()
	if err := c.validate(); err != nil {
		t.Errorf("defaults do not validate: %v", err)
	}
}

func TestCommandLine(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "g.toml")
	os.WriteFile(conf, []byte("min_resend_delay = \"10m\"\nresend_window = \"6h\"\nlisten = \"127.0.0.1:3000\"\nstate_file = \"from-file\"\n"), 0o644)
	for _, tt := range []struct {
		args  []string
		check func(c *Settings) bool
	}{
		{nil, func(c *Settings) bool { return c.Listen == defaultListen && c.StateFile == defaultStateFile }},
		{[]string{"-m", "0.05", ":1999", "s"}, func(c *Settings) bool {
			return c.MinResendDelay.Duration == 3*time.Second && c.Listen == ":1999" && c.StateFile == "s"
		}},
		{[]string{"-t", "0", "-g", "0", "-m", "0", "-s", "0", "127.0.0.1", "s"}, func(c *Settings) bool {
			return c.KnownIPLifetime.Duration == defaultKnownIP && c.ResendWindow.Duration == defaultResendWindow &&
				c.MinResendDelay.Duration == defaultMinDelay && c.SaveInterval.Duration == defaultSaveInterval
		}},
		{[]string{"-d", "-u", "nobody", "-w", "wl", "-s", "1.5", "-t", "0.5", "-g", "2.5", "1.2.3.4:5", "/x"}, func(c *Settings) bool {
			return c.Debug && c.User == "nobody" && c.Whitelist == "wl" && c.SaveInterval.Duration == 90*time.Second &&
				c.KnownIPLifetime.Duration == 12*time.Hour && c.ResendWindow.Duration == 150*time.Minute
		}},
		{[]string{"-c", conf}, func(c *Settings) bool {
			return c.MinResendDelay.Duration == 10*time.Minute && c.Listen == "127.0.0.1:3000" && c.StateFile == "from-file"
		}},
		{[]string{"-c", conf, "-m", "1", "0.0.0.0", "s"}, func(c *Settings) bool {
			return c.MinResendDelay.Duration == time.Minute && c.ResendWindow.Duration == 6*time.Hour && c.Listen == "0.0.0.0"
		}},
		{[]string{"-c", conf, "-m", "0"}, func(c *Settings) bool { return c.MinResendDelay.Duration == 10*time.Minute }},
	} {
		c, err := parseCommandLine(tt.args)
		if err != nil {
			t.Errorf("%q: %v", tt.args, err)
			continue
		}
		if !tt.check(c) {
			t.Errorf("%q: got %+v", tt.args, c)
		}
	}
}

func TestCommandLineErrors(t *testing.T) {
	dir := t.TempDir()
	badConf := filepath.Join(dir, "bad.toml")
	os.WriteFile(badConf, []byte("nope = 1\n"), 0o644)
	for _, tt := range []struct {
		args  []string
		usage bool
		want  string
	}{
		{[]string{"127.0.0.1"}, true, "missing savefile"},
		{[]string{"a", "b", "c"}, true, "unexpected arguments"},
		{[]string{"-m", "five", "a", "b"}, true, "not a number"},
		{[]string{"-m", "-1", "a", "b"}, true, "must not be negative"},
		{[]string{"-m", "NaN", "a", "b"}, true, "not a number"},
		{[]string{"-x"}, true, "not defined"},
		{[]string{"-m"}, true, "needs an argument"},
		{[]string{"-m", "720", "127.0.0.1", "s"}, false, "min_resend_delay: must be below resend_window"},
		{[]string{"-c", filepath.Join(dir, "missing.toml")}, false, "cannot open config"},
		{[]string{"-c", badConf}, false, badConf + ":1: unknown key nope"},
		{[]string{"1.2.3.4:x", "s"}, false, `bad port "x"`},
	} {
		_, err := parseCommandLine(tt.args)
		if err == nil || !strings.Contains(err.Error(), tt.want) || errors.Is(err, errUsage) != tt.usage {
			t.Errorf("%q: got %v, want an error containing %q (usage error: %v)", tt.args, err, tt.want, tt.usage)
		}
	}
}

func TestListenAddress(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1":      "127.0.0.1:1999",
		"127.0.0.1:2000": "127.0.0.1:2000",
		":2000":          ":2000",
		"::1":            "[::1]:1999",
		"[::1]":          "[::1]:1999",
		"[::1]:2000":     "[::1]:2000",
		"localhost":      "localhost:1999",
		"localhost:2000": "localhost:2000",
	} {
		got, err := listenAddress(in)
		if err != nil || got != want {
			t.Errorf("listenAddress(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "[zz]", "1.2.3.4:70000", "a:b:c"} {
		if got, err := listenAddress(bad); err == nil {
			t.Errorf("listenAddress(%q) = %q, want an error", bad, got)
		}
	}
}

// TestExampleConfig checks that the shipped example file is valid.
func TestExampleConfig(t *testing.T) {
	c := defaultConfig()
	if err := loadConfigFile(&c, "greydaemon.example.toml"); err != nil {
		t.Fatal(err)
	}
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
}
