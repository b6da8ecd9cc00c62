package main

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// This file turns a Config into the Settings the daemon runs with: every
// value checked, and everything derived from the values (the address to
// bind, the limits in whole seconds, the allow list) computed here and
// nowhere else.

// Settings are a checked Config and the values derived from it.
type Settings struct {
	Config
	ListenAddr string       // host:port to bind, from Listen
	Policy     Policy       // the time limits in whole seconds
	Allow      *IPRanges    // networks whose queries are answered; nil: every network
	Grouping   addrGrouping // how client addresses are keyed
	PolicyMode fs.FileMode  // the policy socket's mode, from PolicySocketMode
	ListMode   fs.FileMode  // the greylistd socket's mode, from GreylistdSocketMode
	MilterMode fs.FileMode  // the milter socket's mode, from MilterSocketMode
	Source     Source       // where the values came from
}

// A Source says where settings came from, so that an error about a value
// can point at it.
type Source struct {
	File     string          // the -c file, or ""
	FileText []byte          // its contents
	Flags    map[string]bool // keys given on the command line
}

// where returns where key's value came from: "FILE:LINE" when the config
// file sets it and no flag overrides it, "command line" for a flag, and
// "defaults" otherwise.
func (s Source) where(key string) string {
	if s.Flags[key] {
		return "command line"
	}
	if s.File != "" {
		if line := keyLine(s.FileText, key); line > 0 {
			return fmt.Sprintf("%s:%d", s.File, line)
		}
	}
	return "defaults"
}

// describe names key with where its value came from, for an error about
// the value that only shows when it is used: "FILE:LINE: key", or "key
// (command line)", or "key (default)".
func (s Source) describe(key string) string {
	switch w := s.where(key); w {
	case "command line", "defaults":
		return key + " (" + strings.TrimSuffix(w, "s") + ")"
	default:
		return w + ": " + key
	}
}

// A settingError is a problem with the value of one key.
type settingError struct {
	Key, Msg string
}

func (e *settingError) Error() string { return e.Key + ": " + e.Msg }

// problems checks c's values and their combinations, and returns one error
// per problem, each a *settingError.
func (c *Config) problems() []error {
	var p problemList
	c.coreProblems(&p)
	c.durationProblems(&p)
	c.frontEndProblems(&p)
	c.redisProblems(&p)
	return p
}

// A problemList collects the problems with a Config's values.
type problemList []error

// bad records a problem with the value of key.
func (p *problemList) bad(key, format string, args ...any) {
	*p = append(*p, &settingError{key, fmt.Sprintf(format, args...)})
}

// coreProblems checks the qmail listener, the state file, the table's size
// and keys, and the allow list.
func (c *Config) coreProblems(p *problemList) {
	if c.Listen == "" {
		p.bad("listen", "must not be empty")
	} else if _, err := listenAddress(c.Listen); err != nil {
		p.bad("listen", "%v", err)
	}
	if c.StateFile == "" {
		p.bad("state_file", "must not be empty")
	}
	if c.MaxEntries < 1000 {
		p.bad("max_entries", "must be at least 1000, got %d", c.MaxEntries)
	} else if c.MaxEntries > 1<<31 {
		p.bad("max_entries", "must be at most %d, got %d", 1<<31, c.MaxEntries)
	}
	if _, err := parseAllow(c.Allow); err != nil {
		p.bad("allow", "%v", err)
	}
	if c.IPv4Prefix < 8 || c.IPv4Prefix > 32 {
		p.bad("ipv4_prefix", "must be 8 to 32, got %d", c.IPv4Prefix)
	}
	if c.IPv6Prefix < 16 || c.IPv6Prefix > 128 {
		p.bad("ipv6_prefix", "must be 16 to 128, got %d", c.IPv6Prefix)
	}
}

// durationProblems checks the time limits and their combinations.
func (c *Config) durationProblems(p *problemList) {
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"save_interval", c.SaveInterval.Duration},
		{"known_ip_lifetime", c.KnownIPLifetime.Duration},
		{"resend_window", c.ResendWindow.Duration},
		{"min_resend_delay", c.MinResendDelay.Duration},
		{"greylistd_retry_min", c.GreylistdRetryMin.Duration},
		{"greylistd_retry_max", c.GreylistdRetryMax.Duration},
		{"greylistd_expire", c.GreylistdExpire.Duration},
	} {
		switch {
		case d.v <= 0:
			p.bad(d.key, "must be positive, got %q", d.v)
		case d.v > maxDuration:
			p.bad(d.key, "must be at most 100 years, got %q", d.v)
		}
	}
	if c.SaveInterval.Duration > 0 && c.SaveInterval.Duration < time.Second {
		p.bad("save_interval", "must be at least 1s, got %q", c.SaveInterval.Duration)
	}
	if c.MinResendDelay.Duration > 0 && c.ResendWindow.Duration > 0 &&
		ceilSeconds(c.MinResendDelay.Duration) >= ceilSeconds(c.ResendWindow.Duration) {
		p.bad("min_resend_delay", "must be below resend_window (%s), got %s: no retry could ever pass",
			c.ResendWindow.Duration, c.MinResendDelay.Duration)
	}
	if c.GreylistdRetryMin.Duration >= c.GreylistdRetryMax.Duration && c.GreylistdRetryMax.Duration > 0 {
		p.bad("greylistd_retry_min", "must be below greylistd_retry_max (%s), got %s: no retry could ever pass",
			c.GreylistdRetryMax.Duration, c.GreylistdRetryMin.Duration)
	}
}

// frontEndProblems checks the greylistd, Postfix and metrics listeners and
// their settings.
func (c *Config) frontEndProblems(p *problemList) {
	if c.GreylistdListen != "" && !strings.HasPrefix(c.GreylistdListen, "/") {
		p.bad("greylistd_listen", "must be an absolute path to a unix socket, got %q", c.GreylistdListen)
	}
	if _, err := parseSocketMode(c.GreylistdSocketMode); err != nil {
		p.bad("greylistd_socket_mode", "%v", err)
	}
	if _, err := policyAddress(c.PolicyListen); err != nil {
		p.bad("policy_listen", "%v", err)
	}
	if _, err := parseSocketMode(c.PolicySocketMode); err != nil {
		p.bad("policy_socket_mode", "%v", err)
	}
	if err := checkDeferText(c.PolicyDeferText); err != nil {
		p.bad("policy_defer_text", "%v", err)
	}
	if c.PolicyMaxConnections < 1 || c.PolicyMaxConnections > 100_000 {
		p.bad("policy_max_connections", "must be 1 to 100000, got %d", c.PolicyMaxConnections)
	}
	if c.PolicyIdleTimeout.Duration < time.Second || c.PolicyIdleTimeout.Duration > maxDuration {
		p.bad("policy_idle_timeout", "must be at least 1s, got %q", c.PolicyIdleTimeout.Duration)
	}
	c.milterProblems(p)
	if c.MetricsListen != "" {
		if _, port, err := net.SplitHostPort(c.MetricsListen); err != nil {
			p.bad("metrics_listen", "want host:port, got %q", c.MetricsListen)
		} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			p.bad("metrics_listen", "bad port %q in %q", port, c.MetricsListen)
		}
	}
}

// milterProblems checks the milter listener and its settings.
func (c *Config) milterProblems(p *problemList) {
	if _, err := policyAddress(c.MilterListen); err != nil {
		p.bad("milter_listen", "%v", err)
	}
	if _, err := parseSocketMode(c.MilterSocketMode); err != nil {
		p.bad("milter_socket_mode", "%v", err)
	}
	if c.MilterMaxConnections < 1 || c.MilterMaxConnections > 100_000 {
		p.bad("milter_max_connections", "must be 1 to 100000, got %d", c.MilterMaxConnections)
	}
	if c.MilterIdleTimeout.Duration < time.Second || c.MilterIdleTimeout.Duration > maxDuration {
		p.bad("milter_idle_timeout", "must be at least 1s, got %q", c.MilterIdleTimeout.Duration)
	}
}

// redisProblems checks the Redis settings.
func (c *Config) redisProblems(p *problemList) {
	switch {
	case c.RedisURL != "" && len(c.RedisSentinels) > 0:
		p.bad("redis_url", "give redis_url or redis_sentinels, not both")
	case c.RedisURL != "" && !strings.HasPrefix(c.RedisURL, "redis://") && !strings.HasPrefix(c.RedisURL, "rediss://") &&
		!strings.HasPrefix(c.RedisURL, "unix://"):
		p.bad("redis_url", "want redis://[user:pass@]host:port/db, rediss://... or unix:///path, got %q", c.RedisURL)
	case len(c.RedisSentinels) > 0 && c.RedisMaster == "":
		p.bad("redis_master", "must name the master when redis_sentinels is set")
	}
	if c.RedisTimeout.Duration < time.Millisecond || c.RedisTimeout.Duration > 3*time.Second {
		p.bad("redis_timeout", "must be 1ms to 3s (qmail-smtpd waits 3 s in all), got %q", c.RedisTimeout.Duration)
	}
	switch c.RedisFallback {
	case fallbackLocal, fallbackAccept, fallbackTempfail:
	default:
		p.bad("redis_fallback", "must be %q, %q or %q, got %q", fallbackLocal, fallbackAccept, fallbackTempfail, c.RedisFallback)
	}
}

// validate returns every problem with c's values joined into one error, or
// nil.
func (c *Config) validate() error { return errors.Join(c.problems()...) }

// resolve checks c, whose values came from src, and derives the settings
// the daemon runs with. The error lists every problem, each with where the
// value came from.
func resolve(c Config, src Source) (*Settings, error) {
	if errs := c.problems(); len(errs) > 0 {
		lines := make([]string, len(errs))
		for i, err := range errs {
			lines[i] = err.Error()
			var se *settingError
			if errors.As(err, &se) {
				lines[i] = src.where(se.Key) + ": " + lines[i]
			}
		}
		return nil, fmt.Errorf("bad settings: %s", strings.Join(lines, "; "))
	}
	addr, _ := listenAddress(c.Listen)
	allow, _ := parseAllow(c.Allow)
	mode, _ := parseSocketMode(c.PolicySocketMode)
	listMode, _ := parseSocketMode(c.GreylistdSocketMode)
	milterMode, _ := parseSocketMode(c.MilterSocketMode)
	return &Settings{
		Config:     c,
		ListenAddr: addr,
		Grouping:   addrGrouping{v4Bits: c.IPv4Prefix, v6Bits: c.IPv6Prefix},
		PolicyMode: mode,
		ListMode:   listMode,
		MilterMode: milterMode,
		Policy: Policy{
			KnownIPLifetime: ceilSeconds(c.KnownIPLifetime.Duration),
			ResendWindow:    ceilSeconds(c.ResendWindow.Duration),
			MinResendDelay:  ceilSeconds(c.MinResendDelay.Duration),
			ListRetryMin:    uint32(min(c.GreylistdRetryMin.Duration/time.Second, math.MaxUint32-1)),
			ListRetryMax:    uint32(min(c.GreylistdRetryMax.Duration/time.Second, math.MaxUint32-1)),
			ListExpire:      uint32(min(c.GreylistdExpire.Duration/time.Second, math.MaxUint32-1)),
		},
		Allow:  allow,
		Source: src,
	}, nil
}

// ceilSeconds returns d in whole seconds, rounded up, at most MaxUint32-1.
// For whole-second ages, age < ceil(limit) is the Perl daemon's test
// against a fractional limit.
func ceilSeconds(d time.Duration) uint32 {
	s := (d + time.Second - 1) / time.Second
	if s >= math.MaxUint32 {
		return math.MaxUint32 - 1
	}
	return uint32(max(s, 0))
}

// parseSocketMode parses an octal file mode such as "0660".
func parseSocketMode(s string) (fs.FileMode, error) {
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("want an octal mode such as \"0660\", got %q", s)
	}
	return fs.FileMode(n), nil
}

// parseAllow parses the allow list; an empty list gives nil (answer
// everyone). Unlike the whitelist file, host bits set in a range are an
// error here: there is no legacy file to stay compatible with.
func parseAllow(list []string) (*IPRanges, error) {
	if len(list) == 0 {
		return nil, nil
	}
	r := &IPRanges{}
	for _, s := range list {
		p, masked, err := parseRange(strings.TrimSpace(s))
		if err != nil {
			return nil, err
		}
		if masked {
			return nil, fmt.Errorf("%q has host bits set (did you mean %s?)", s, p)
		}
		r.add(p)
	}
	return r, nil
}

// listenAddress turns the Perl daemon's ipaddr[:port] into a host:port for
// net.ListenUDP. The address may be an IPv4 or IPv6 address (bare or in
// brackets), a host name, or empty before ":port" (all interfaces); without
// a port the port is 1999.
func listenAddress(s string) (string, error) {
	if addr, err := netip.ParseAddr(s); err == nil {
		return net.JoinHostPort(addr.String(), defaultPort), nil
	}
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		addr, err := netip.ParseAddr(s[1 : len(s)-1])
		if err != nil {
			return "", fmt.Errorf("bad IPv6 address in %q", s)
		}
		return net.JoinHostPort(addr.String(), defaultPort), nil
	}
	if !strings.Contains(s, ":") {
		if s == "" {
			return "", fmt.Errorf("empty listen address")
		}
		return net.JoinHostPort(s, defaultPort), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("bad listen address %q: %v", s, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", fmt.Errorf("bad port %q in listen address %q", port, s)
	}
	return net.JoinHostPort(host, port), nil
}

// usesRedis reports whether decisions go to Redis.
func (s *Settings) usesRedis() bool { return s.RedisURL != "" || len(s.RedisSentinels) > 0 }
