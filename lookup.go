package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"time"
)

// nowFunc is the clock of the commands that read a state file.
var nowFunc = time.Now

// lookupCommand is `greydaemon lookup [-c FILE | savefile] IP [SENDER
// RECIPIENT]`: it answers an admin's "why did this mail get 450, and when
// will it pass?" from the state file, as of its last save (SIGUSR1 saves at
// once). The limits are the config file's with -c, else those the snapshot
// was written with, else the defaults.
func lookupCommand(args []string, w io.Writer, now func() time.Time) error {
	l, err := parseLookup(args)
	if err != nil {
		return err
	}
	if err := l.read(); err != nil {
		return err
	}
	l.now = now()
	l.reportFile(w)
	if l.reportClient(w) && len(l.pos) == 3 {
		l.reportTriplet(w)
	}
	return nil
}

// A lookup is one run of the lookup command: what it asks, and what the
// state file holds about it.
type lookup struct {
	c      Config
	wl     *IPRanges
	policy *Policy // nil until known: the config's, or the snapshot's
	pos    []string
	client Client
	sender Sender

	triplet         tripletKey
	known, grey     uint32 // when the client was last seen, the triplet first seen
	isKnown, isGrey bool
	st              loadStats
	missing         bool // no state file yet
	now             time.Time
}

// parseLookup reads the command line of lookup, and the config file it
// names.
func parseLookup(args []string) (*lookup, error) {
	flags := flag.NewFlagSet("lookup", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	configPath := flags.String("c", "", "")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, errHelp
		}
		return nil, fmt.Errorf("%w: lookup: %v", errUsage, err)
	}
	l := &lookup{c: defaultConfig(), pos: flags.Args()}
	switch {
	case *configPath != "":
		if err := loadConfigFile(&l.c, *configPath); err != nil {
			return nil, err
		}
		set, err := resolve(l.c, Source{File: *configPath})
		if err != nil {
			return nil, err
		}
		l.policy = &set.Policy
		if l.c.Whitelist != "" {
			if l.wl, err = LoadWhitelist(l.c.Whitelist, nil); err != nil {
				return nil, err
			}
		}
	case len(l.pos) == 2 || len(l.pos) == 4:
		l.c.StateFile, l.pos = l.pos[0], l.pos[1:]
	}
	if len(l.pos) != 1 && len(l.pos) != 3 {
		return nil, fmt.Errorf("%w: lookup takes IP, or IP SENDER RECIPIENT", errUsage)
	}
	l.client = ParseClient([]byte(l.pos[0]), addrGrouping{v4Bits: l.c.IPv4Prefix, v6Bits: l.c.IPv6Prefix})
	if len(l.pos) == 3 {
		var kb keyBuilder
		l.sender = ParseSender([]byte(l.pos[1]), l.c.NormalizeSender, &kb)
		l.triplet = kb.triplet(l.client.key, l.sender.text, []byte(l.pos[2]))
	}
	return l, nil
}

// read finds the client and the triplet in the state file, and settles
// the limits: the config's, else the snapshot's, else the defaults.
func (l *lookup) read() error {
	data, err := readStateFile(l.c.StateFile)
	l.missing = errors.Is(err, fs.ErrNotExist)
	if err != nil && !l.missing {
		return err
	}
	l.st, err = decodeStateFile(data, func(kind int, k [16]byte, t uint32) bool {
		switch {
		case kind == blockKnown && k == l.client.key:
			l.known, l.isKnown = t, true
		case kind == blockGrey && len(l.pos) == 3 && k == l.triplet:
			l.grey, l.isGrey = t, true
		}
		return true
	}, nil)
	if err != nil {
		return fmt.Errorf("%q: %w", l.c.StateFile, err)
	}
	if l.policy == nil {
		l.policy = l.st.policy
	}
	if l.policy == nil {
		l.policy = &Policy{
			KnownIPLifetime: ceilSeconds(defaultKnownIP),
			ResendWindow:    ceilSeconds(defaultResendWindow),
			MinResendDelay:  ceilSeconds(defaultMinDelay),
		}
	}
	return nil
}

// when describes the unix time unix against now: the date, and how long
// ago or from now.
func (l *lookup) when(unix uint32) string {
	at := time.Unix(int64(unix), 0)
	d := at.Sub(l.now).Round(time.Second)
	switch {
	case d == 0:
		return at.Format(time.DateTime) + " (now)"
	case d < 0:
		return fmt.Sprintf("%s (%s ago)", at.Format(time.DateTime), -d)
	}
	return fmt.Sprintf("%s (in %s)", at.Format(time.DateTime), d)
}

// reportFile says which state file the answer comes from.
func (l *lookup) reportFile(w io.Writer) {
	switch {
	case l.missing:
		fmt.Fprintf(w, "state file %s: not there yet\n", l.c.StateFile)
	case !l.st.written.IsZero():
		fmt.Fprintf(w, "state file %s: written %s\n", l.c.StateFile, l.when(uint32(l.st.written.Unix())))
	default:
		fmt.Fprintf(w, "state file %s (%s format)\n", l.c.StateFile, l.st.format)
	}
}

// reportClient says what the client is, and returns false when that
// decides every triplet (whitelisted, or a known IP).
func (l *lookup) reportClient(w io.Writer) bool {
	sec, ip, p := uint32(max(l.now.Unix(), 0)), l.pos[0], l.policy
	switch {
	case l.client.isIP && l.wl.Contains(l.client.addr):
		fmt.Fprintf(w, "client %s: whitelisted in %s: accepted (01 01)\n", ip, l.c.Whitelist)
		return false
	case l.isKnown && age(sec, l.known) < p.KnownIPLifetime:
		fmt.Fprintf(w, "client %s: known IP, last seen %s: accepted (01 02) until %s, and each message moves that on\n",
			ip, l.when(l.known), l.when(l.known+p.KnownIPLifetime))
		return false
	case l.isKnown:
		fmt.Fprintf(w, "client %s: was a known IP, last seen %s; expired %s\n", ip, l.when(l.known), l.when(l.known+p.KnownIPLifetime))
	default:
		fmt.Fprintf(w, "client %s: not a known IP; each triplet is greylisted until a retry passes\n", ip)
	}
	return true
}

// reportTriplet says what the triplet's next attempt gets, and when that
// changes.
func (l *lookup) reportTriplet(w io.Writer) {
	sec, p, grey := uint32(max(l.now.Unix(), 0)), l.policy, l.grey
	what := fmt.Sprintf("triplet %s %s %s", l.pos[0], l.pos[1], l.pos[2])
	switch {
	case l.sender.null && looksLikeVERP([]byte(l.pos[2])):
		fmt.Fprintf(w, "%s: null sender and a VERP-looking recipient: accepted by the bounce rule (01 04)\n", what)
	case !l.isGrey:
		fmt.Fprintf(w, "%s: not seen; the next attempt is greylisted (00 01), and a retry from %s later passes\n",
			what, time.Duration(p.MinResendDelay)*time.Second)
	case age(sec, grey) < p.MinResendDelay:
		fmt.Fprintf(w, "%s: first seen %s; a retry now is too soon (00 02); it passes from %s until %s\n",
			what, l.when(grey), l.when(grey+p.MinResendDelay), l.when(grey+p.ResendWindow))
	case age(sec, grey) < p.ResendWindow:
		fmt.Fprintf(w, "%s: first seen %s; a retry now passes (01 03) and makes the client a known IP, until %s\n",
			what, l.when(grey), l.when(grey+p.ResendWindow))
	default:
		fmt.Fprintf(w, "%s: first seen %s; the resend window ended %s, so the next attempt starts over (00 03)\n",
			what, l.when(grey), l.when(grey+p.ResendWindow))
	}
}
