package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// This file is the TOML configuration file: its keys, their defaults and
// how values are written. It knows nothing of the rest of the daemon;
// settings.go checks the values and derives what the daemon uses from them.

// Config holds every setting of the daemon as the TOML file (-c) and the
// command line give it. The keys mirror the Perl daemon's options; the later
// ones are greydaemon's own.
type Config struct {
	Listen          string   `toml:"listen"`            // ipaddr[:port], as the Perl positional
	StateFile       string   `toml:"state_file"`        // the Perl savefile positional
	User            string   `toml:"user"`              // -u
	Whitelist       string   `toml:"whitelist"`         // -w
	SaveInterval    Duration `toml:"save_interval"`     // -s (minutes)
	KnownIPLifetime Duration `toml:"known_ip_lifetime"` // -t (days)
	ResendWindow    Duration `toml:"resend_window"`     // -g (hours)
	MinResendDelay  Duration `toml:"min_resend_delay"`  // -m (minutes)
	Debug           bool     `toml:"debug"`             // -d
	MaxEntries      int      `toml:"max_entries"`       // hard cap on table entries
	Allow           []string `toml:"allow"`             // networks whose queries are answered; empty: all
	MetricsListen   string   `toml:"metrics_listen"`    // host:port of the Prometheus endpoint; empty: off
	IPv4Prefix      int      `toml:"ipv4_prefix"`       // clients keyed by their /N (32: each address)
	IPv6Prefix      int      `toml:"ipv6_prefix"`       // clients keyed by their /N (128: each address)
	NormalizeSender bool     `toml:"normalize_sender"`  // take BATV, SRS and VERP tags out of keys

	// Postfix policy delegation (policy.go).
	PolicyListen         string   `toml:"policy_listen"`          // host:port or unix:/path; empty: off
	PolicySocketMode     string   `toml:"policy_socket_mode"`     // octal mode of a unix socket
	PolicyGroup          string   `toml:"policy_socket_group"`    // group of a unix socket (postfix's); empty: the daemon's
	PolicyDeferText      string   `toml:"policy_defer_text"`      // after DEFER_IF_PERMIT; %s: seconds left, %r: recipient domain
	PolicyPrependHeader  bool     `toml:"policy_prepend_header"`  // X-Greylist header on mail that passed after a retry
	PolicyMaxConnections int      `toml:"policy_max_connections"` // connections served at once
	PolicyIdleTimeout    Duration `toml:"policy_idle_timeout"`    // a connection idle this long is closed

	// greylistd's protocol, for Exim (greylistd.go).
	GreylistdListen     string   `toml:"greylistd_listen"`       // unix socket path; empty: off
	GreylistdSocketMode string   `toml:"greylistd_socket_mode"`  // octal mode of the socket
	GreylistdGroup      string   `toml:"greylistd_socket_group"` // group of the socket (Exim's, e.g. Debian-exim); empty: the daemon's
	GreylistdRetryMin   Duration `toml:"greylistd_retry_min"`    // greylistd's retryMin: grey turns white after this
	GreylistdRetryMax   Duration `toml:"greylistd_retry_max"`    // greylistd's retryMax: grey entries unseen this long go
	GreylistdExpire     Duration `toml:"greylistd_expire"`       // greylistd's expire: white and black entries unseen this long go

	// The milter protocol, for Sendmail and other MTAs (milter.go).
	MilterListen         string   `toml:"milter_listen"`          // host:port or unix:/path; empty: off
	MilterSocketMode     string   `toml:"milter_socket_mode"`     // octal mode of a unix socket
	MilterGroup          string   `toml:"milter_socket_group"`    // group of a unix socket (the MTA's); empty: the daemon's
	MilterMaxConnections int      `toml:"milter_max_connections"` // conversations served at once
	MilterIdleTimeout    Duration `toml:"milter_idle_timeout"`    // a conversation silent this long is closed
	MilterAddHeader      bool     `toml:"milter_add_header"`      // X-Greylist header on mail that passed after a retry
	MilterDelayedReject  bool     `toml:"milter_delayed_reject"`  // decide a null sender's recipients at DATA

	// Shared state in Redis (redis.go).
	RedisURL       string   `toml:"redis_url"`       // redis://[user:pass@]host:port/db or rediss://; empty: off
	RedisSentinels []string `toml:"redis_sentinels"` // host:port of Sentinels, instead of redis_url
	RedisMaster    string   `toml:"redis_master"`    // the Sentinels' name for the master
	RedisPrefix    string   `toml:"redis_prefix"`    // before every key
	RedisTimeout   Duration `toml:"redis_timeout"`   // deadline of each call
	RedisFallback  string   `toml:"redis_fallback"`  // local, accept or tempfail when Redis cannot answer
}

// The defaults, the Perl daemon's where it has one.
const (
	defaultListen       = "127.0.0.1:1999"
	defaultPort         = "1999"
	defaultStateFile    = "greydaemon.state"
	defaultMaxEntries   = 2_000_000
	defaultSaveInterval = 10 * time.Minute
	defaultKnownIP      = 7 * 24 * time.Hour
	defaultResendWindow = 12 * time.Hour
	defaultMinDelay     = 5 * time.Minute
	defaultDeferText    = "Greylisted, please try again in %s seconds"
)

// The values of redis_fallback: what decides when Redis cannot answer.
const (
	fallbackLocal    = "local"    // this daemon's own table
	fallbackAccept   = "accept"   // let the mail through
	fallbackTempfail = "tempfail" // greylist it
)

// defaultConfig returns the settings used when neither file nor flags say
// otherwise.
func defaultConfig() Config {
	return Config{
		Listen:          defaultListen,
		StateFile:       defaultStateFile,
		SaveInterval:    Duration{defaultSaveInterval},
		KnownIPLifetime: Duration{defaultKnownIP},
		ResendWindow:    Duration{defaultResendWindow},
		MinResendDelay:  Duration{defaultMinDelay},
		MaxEntries:      defaultMaxEntries,
		IPv4Prefix:      32,
		IPv6Prefix:      128,

		PolicySocketMode:     "0660",
		PolicyDeferText:      defaultDeferText,
		PolicyPrependHeader:  true,
		PolicyMaxConnections: 256,
		PolicyIdleTimeout:    Duration{10 * time.Minute},

		MilterSocketMode:     "0660",
		MilterMaxConnections: 256,
		MilterIdleTimeout:    Duration{time.Hour},
		MilterAddHeader:      true,

		GreylistdSocketMode: "0660",
		GreylistdRetryMin:   Duration{10 * time.Minute},
		GreylistdRetryMax:   Duration{8 * time.Hour},
		GreylistdExpire:     Duration{60 * 24 * time.Hour},

		RedisPrefix:   "greydaemon:",
		RedisTimeout:  Duration{250 * time.Millisecond},
		RedisFallback: fallbackLocal,
	}
}

// A Duration is a time.Duration that TOML writes as a string: a Go duration
// ("90s", "5m", "12h") or a number of days ("7d", "1.5d").
type Duration struct {
	time.Duration
}

// UnmarshalText parses a duration string.
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := parseDuration(string(text))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalText writes d in Go's duration syntax.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// maxDuration bounds every duration setting: the table stores seconds in 32
// bits, so longer limits would mean nothing. 100 years is plenty.
const maxDuration = 100 * 365 * 24 * time.Hour

func parseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseFloat(days, 64)
		if err != nil || math.IsNaN(n) || math.IsInf(n, 0) || strings.ContainsAny(days, "eExXpP_") {
			return 0, fmt.Errorf("invalid duration %q", s)
		}
		if n*24 > float64(maxDuration/time.Hour) || n*24 < -float64(maxDuration/time.Hour) {
			return 0, fmt.Errorf("duration %q is too long", s)
		}
		return time.Duration(n * float64(24*time.Hour)), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q (want e.g. \"90s\", \"5m\", \"12h\" or \"7d\")", s)
	}
	return d, nil
}

// loadConfigFile reads the TOML file at path over c.
func loadConfigFile(c *Config, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("cannot open config: %w", err)
	}
	defer f.Close()
	return parseConfig(c, f, path)
}

// parseConfig decodes TOML from r over c, which holds the defaults. Unknown
// keys and values of the wrong type are errors naming the file, the line
// where it can, and the key; every one is reported, not just the first.
func parseConfig(c *Config, r io.Reader, name string) error {
	text, err := io.ReadAll(r)
	if err != nil {
		return fmt.Errorf("cannot read %s: %w", name, err)
	}
	// First the syntax, into undecoded values; then each key on its own,
	// so that one bad value does not hide the next.
	var values map[string]toml.Primitive
	md, err := toml.Decode(string(text), &values)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			return fmt.Errorf("%s:%d: %s", name, perr.Position.Line, perr.Message)
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	where := func(key string) string {
		if line := keyLine(text, key); line > 0 {
			return fmt.Sprintf("%s:%d", name, line)
		}
		return name
	}
	fields := reflect.ValueOf(c).Elem()
	known := map[string]bool{}
	var errs []error
	for i := range fields.NumField() {
		key := fields.Type().Field(i).Tag.Get("toml")
		known[key] = true
		v, ok := values[key]
		if !ok {
			continue
		}
		if err := md.PrimitiveDecode(v, fields.Field(i).Addr().Interface()); err != nil {
			var perr toml.ParseError
			if errors.As(err, &perr) {
				err = errors.New(perr.Message)
			} else {
				// The file and the line come first already.
				err = errors.New(tomlPosition.ReplaceAllString(err.Error(), ""))
			}
			errs = append(errs, fmt.Errorf("%s: %s: %w", where(key), key, err))
		}
	}
	var unknown []string
	for key := range values {
		if !known[key] {
			unknown = append(unknown, key)
		}
	}
	slices.Sort(unknown)
	for _, key := range unknown {
		errs = append(errs, fmt.Errorf("%s: unknown key %s", where(key), key))
	}
	return errors.Join(errs...)
}

// tomlPosition matches the position the toml package puts before a
// decoding error.
var tomlPosition = regexp.MustCompile(`^toml: line \d+ \(last key "[^"]*"\): `)

// keyLine returns the line of the TOML text on which key is assigned, or 0.
// greydaemon's configuration is flat, so "key =" at the start of a line is
// the assignment.
func keyLine(text []byte, key string) int {
	for i, line := range strings.Split(string(text), "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), key)
		if ok && strings.HasPrefix(strings.TrimSpace(rest), "=") {
			return i + 1
		}
	}
	return 0
}
