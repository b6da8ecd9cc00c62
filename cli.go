package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

const usageText = `usage: greydaemon [-d] [-c config.toml] [-u user] [-w whitelist] [-s minutes]
                  [-t days] [-g hours] [-m minutes] [ipaddr[:port] savefile]
       greydaemon dump FILE

  -c file     read settings from a TOML file; flags override it
  -d          debug: log more detail
  -u user     switch to user (its primary group, no supplementary groups) after binding
  -w file     whitelist of client IP ranges, one per line
  -s minutes  save interval (default 10)
  -t days     known-IP lifetime (default 7)
  -g hours    resend window (default 12)
  -m minutes  minimum resend delay (default 5)

Numbers may be fractional (-m 0.05 is 3 seconds); 0 means the default.
Without positionals greydaemon listens on 127.0.0.1:1999 and keeps its state
in ./greydaemon.state (or where the config file says).
`

// errUsage is returned for a command line that cannot be understood; the
// caller prints usageText.
var errUsage = errors.New("bad command line")

// A unitFlag is a flag whose value is a number of units, as the Perl
// daemon's -s, -t, -g and -m are. It records the value only when it is not
// zero: the Perl daemon treats 0 as "use the default".
type unitFlag struct {
	unit time.Duration
	set  bool
	v    time.Duration
}

func (f *unitFlag) String() string { return "" }

func (f *unitFlag) Set(s string) error {
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(n) || math.IsInf(n, 0) {
		return fmt.Errorf("not a number: %q", s)
	}
	if n < 0 {
		return fmt.Errorf("must not be negative: %q", s)
	}
	if n*float64(f.unit) > float64(maxDuration) {
		return fmt.Errorf("too large: %q", s)
	}
	f.set, f.v = n != 0, time.Duration(n*float64(f.unit))
	return nil
}

// parseCommandLine builds the configuration from the Perl-style command line
// args (without the program name): the defaults, then the -c file if any,
// then the flags and positionals. Errors about the command line wrap
// errUsage.
func parseCommandLine(args []string, stderr io.Writer) (*Config, error) {
	fs := flag.NewFlagSet("greydaemon", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var (
		configPath = fs.String("c", "", "")
		debug      = fs.Bool("d", false, "")
		user       = fs.String("u", "", "")
		whitelist  = fs.String("w", "", "")
		save       = &unitFlag{unit: time.Minute}
		known      = &unitFlag{unit: 24 * time.Hour}
		window     = &unitFlag{unit: time.Hour}
		minDelay   = &unitFlag{unit: time.Minute}
	)
	fs.Var(save, "s", "")
	fs.Var(known, "t", "")
	fs.Var(window, "g", "")
	fs.Var(minDelay, "m", "")
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	c := defaultConfig()
	if *configPath != "" {
		if err := loadConfigFile(&c, *configPath); err != nil {
			return nil, err
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["d"] {
		c.Debug = *debug
	}
	if set["u"] {
		c.User = *user
	}
	if set["w"] {
		c.Whitelist = *whitelist
	}
	for _, f := range []struct {
		flag *unitFlag
		dst  *Duration
	}{{save, &c.SaveInterval}, {known, &c.KnownIPLifetime}, {window, &c.ResendWindow}, {minDelay, &c.MinResendDelay}} {
		if f.flag.set {
			f.dst.Duration = f.flag.v
		}
	}
	switch pos := fs.Args(); len(pos) {
	case 0:
	case 2:
		c.Listen, c.StateFile = pos[0], pos[1]
	case 1:
		return nil, fmt.Errorf("%w: missing savefile after %q", errUsage, pos[0])
	default:
		return nil, fmt.Errorf("%w: unexpected arguments after savefile: %q", errUsage, pos[2:])
	}
	if err := c.validate(); err != nil {
		where := "command line"
		if *configPath != "" {
			where = fmt.Sprintf("command line and %s", *configPath)
		}
		return nil, fmt.Errorf("bad settings (%s): %w", where, err)
	}
	return &c, nil
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
