package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"time"
)

// This file reads the Perl daemon's command line (and -c, greydaemon's
// own) into a Config.

const usageText = `usage: greydaemon [-d] [-c config.toml] [-u user] [-w whitelist] [-s minutes]
                  [-t days] [-g hours] [-m minutes] [ipaddr[:port] savefile]
       greydaemon check [-redis] [-c config.toml] [flags] [ipaddr[:port] savefile]
       greydaemon lookup [-c config.toml | savefile] IP [SENDER RECIPIENT]
       greydaemon import-redis [-c config.toml] [flags] savefile
       greydaemon import-greylistd [-c config.toml] [flags] STATES TRIPLETS
       greydaemon greylist [-c config.toml | -socket path] ACTION [--white|--grey|--black] [DATA...]
       greydaemon dump FILE
       greydaemon version

  -c file     read settings from a TOML file; flags override it
  -d          debug: log more detail
  -u user     switch to user (its primary group, no supplementary groups) after binding
  -w file     whitelist of client IP ranges, one per line
  -s minutes  save interval (default 10)
  -t days     known-IP lifetime (default 7)
  -g hours    resend window (default 12)
  -m minutes  minimum resend delay (default 5)
  -h          print this help

Numbers may be fractional (-m 0.05 is 3 seconds); 0 means the default.
Without positionals greydaemon listens on 127.0.0.1:1999 and keeps its state
in ./greydaemon.state (or where the config file says).

  check    validate the settings, the whitelist and the state file; exit 1 on any problem
  lookup   explain from the state file how a client or a triplet will be answered
  import-redis  copy a snapshot or Perl save file into the Redis the settings name
  import-greylistd  add greylistd's entries (its states and triplets files) to the state file
  greylist send one request to the greylistd socket, as greylistd's greylist tool:
           ACTION is update, check, add, delete, status, stats, mrtg, list, clear or save
  dump     print a state file as Perl save-file lines
  version  print the version and the source revision

Signals: SIGTERM and SIGINT save and stop, SIGHUP re-reads the config file and
the whitelist, SIGUSR1 saves at once. See greydaemon(8).
`

// errUsage is returned for a command line that cannot be understood; the
// caller prints usageText.
var errUsage = errors.New("bad command line")

// errHelp is returned when the command line asks for help (-h).
var errHelp = errors.New("help requested")

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

// parseCommandLine returns the settings that the Perl-style command line
// args (without the program name) give: the defaults, then the -c file if
// any, then the flags and positionals, checked and resolved. Errors about
// the command line itself wrap errUsage.
func parseCommandLine(args []string) (*Settings, error) {
	c, src, err := readCommandLine(args)
	if err != nil {
		return nil, err
	}
	return resolve(c, src)
}

// readCommandLine reads args into a Config without checking the values, and
// says where they came from.
func readCommandLine(args []string) (Config, Source, error) {
	fs := flag.NewFlagSet("greydaemon", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	flags := definePerlFlags(fs)
	c := defaultConfig()
	src := Source{Flags: map[string]bool{}}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, src, errHelp
		}
		return c, src, fmt.Errorf("%w: %v", errUsage, err)
	}
	if *flags.configPath != "" {
		text, err := os.ReadFile(*flags.configPath)
		if err != nil {
			return c, src, fmt.Errorf("cannot open config: %w", err)
		}
		src.File, src.FileText = *flags.configPath, text
		if err := parseConfig(&c, bytes.NewReader(text), *flags.configPath); err != nil {
			return c, src, err
		}
	}
	flags.apply(fs, &c, &src)
	switch pos := fs.Args(); len(pos) {
	case 0:
	case 2:
		c.Listen, c.StateFile = pos[0], pos[1]
		src.Flags["listen"], src.Flags["state_file"] = true, true
	case 1:
		return c, src, fmt.Errorf("%w: missing savefile after %q", errUsage, pos[0])
	default:
		return c, src, fmt.Errorf("%w: unexpected arguments after savefile: %q", errUsage, pos[2:])
	}
	return c, src, nil
}

// perlFlags are the Perl daemon's flags, and -c.
type perlFlags struct {
	configPath, user, whitelist *string
	debug                       *bool
	save, known, window, delay  *unitFlag
}

// definePerlFlags defines the flags on fs.
func definePerlFlags(fs *flag.FlagSet) *perlFlags {
	f := &perlFlags{
		configPath: fs.String("c", "", ""),
		debug:      fs.Bool("d", false, ""),
		user:       fs.String("u", "", ""),
		whitelist:  fs.String("w", "", ""),
		save:       &unitFlag{unit: time.Minute},
		known:      &unitFlag{unit: 24 * time.Hour},
		window:     &unitFlag{unit: time.Hour},
		delay:      &unitFlag{unit: time.Minute},
	}
	fs.Var(f.save, "s", "")
	fs.Var(f.known, "t", "")
	fs.Var(f.window, "g", "")
	fs.Var(f.delay, "m", "")
	return f
}

// apply sets in c the values of the flags given on fs (parsed), over the
// config file's, and records them in src as the command line's.
func (f *perlFlags) apply(fs *flag.FlagSet, c *Config, src *Source) {
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	if set["d"] {
		c.Debug = *f.debug
		src.Flags["debug"] = true
	}
	if set["u"] {
		c.User = *f.user
		src.Flags["user"] = true
	}
	if set["w"] {
		c.Whitelist = *f.whitelist
		src.Flags["whitelist"] = true
	}
	for _, d := range []struct {
		flag *unitFlag
		dst  *Duration
		key  string
	}{
		{f.save, &c.SaveInterval, "save_interval"},
		{f.known, &c.KnownIPLifetime, "known_ip_lifetime"},
		{f.window, &c.ResendWindow, "resend_window"},
		{f.delay, &c.MinResendDelay, "min_resend_delay"},
	} {
		if d.flag.set {
			d.dst.Duration = d.flag.v
			src.Flags[d.key] = true
		}
	}
}
