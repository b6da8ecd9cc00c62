package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Config holds every setting of the daemon. The TOML file (-c) and the
// command line fill it; the keys mirror the Perl daemon's options.
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
// keys and values of the wrong type are errors naming the key and name.
func parseConfig(c *Config, r io.Reader, name string) error {
	md, err := toml.NewDecoder(r).Decode(c)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			return fmt.Errorf("%s: line %d: %s", name, perr.Position.Line, perr.Message)
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return fmt.Errorf("%s: unknown key %s", name, strings.Join(keys, ", "))
	}
	return nil
}

// validate checks c's values and their combinations. Its errors name the
// key; the caller adds where the value came from.
func (c *Config) validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.Listen == "" {
		bad("listen", "must not be empty")
	} else if _, err := listenAddress(c.Listen); err != nil {
		bad("listen", "%v", err)
	}
	if c.StateFile == "" {
		bad("state_file", "must not be empty")
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"save_interval", c.SaveInterval.Duration},
		{"known_ip_lifetime", c.KnownIPLifetime.Duration},
		{"resend_window", c.ResendWindow.Duration},
		{"min_resend_delay", c.MinResendDelay.Duration},
	} {
		switch {
		case d.v <= 0:
			bad(d.key, "must be positive, got %q", d.v)
		case d.v > maxDuration:
			bad(d.key, "must be at most 100 years, got %q", d.v)
		}
	}
	if c.SaveInterval.Duration > 0 && c.SaveInterval.Duration < time.Second {
		bad("save_interval", "must be at least 1s, got %q", c.SaveInterval.Duration)
	}
	if c.MinResendDelay.Duration > 0 && c.ResendWindow.Duration > 0 &&
		ceilSeconds(c.MinResendDelay.Duration) >= ceilSeconds(c.ResendWindow.Duration) {
		bad("min_resend_delay", "must be below resend_window (%s), got %s: no retry could ever pass",
			c.ResendWindow.Duration, c.MinResendDelay.Duration)
	}
	if c.MaxEntries < 1000 {
		bad("max_entries", "must be at least 1000, got %d", c.MaxEntries)
	} else if c.MaxEntries > 1<<31 {
		bad("max_entries", "must be at most %d, got %d", 1<<31, c.MaxEntries)
	}
	return errors.Join(errs...)
}
