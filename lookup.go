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
	flags := flag.NewFlagSet("lookup", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	configPath := flags.String("c", "", "")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return fmt.Errorf("%w: lookup: %v", errUsage, err)
	}
	pos := flags.Args()
	c := defaultConfig()
	var wl *IPRanges
	var policy *Policy
	switch {
	case *configPath != "":
		if err := loadConfigFile(&c, *configPath); err != nil {
			return err
		}
		set, err := resolve(c, Source{File: *configPath})
		if err != nil {
			return err
		}
		policy = &set.Policy
		if c.Whitelist != "" {
			if wl, err = LoadWhitelist(c.Whitelist, nil); err != nil {
				return err
			}
		}
	case len(pos) == 2 || len(pos) == 4:
		c.StateFile, pos = pos[0], pos[1:]
	}
	if len(pos) != 1 && len(pos) != 3 {
		return fmt.Errorf("%w: lookup takes IP, or IP SENDER RECIPIENT", errUsage)
	}

	client := ParseClient([]byte(pos[0]), addrGrouping{v4Bits: c.IPv4Prefix, v6Bits: c.IPv6Prefix})
	var triplet tripletKey
	var sender Sender
	if len(pos) == 3 {
		var kb keyBuilder
		sender = ParseSender([]byte(pos[1]), c.NormalizeSender, &kb)
		triplet = kb.triplet(client.key, sender.text, []byte(pos[2]))
	}
	var known, grey uint32
	var isKnown, isGrey bool
	data, err := readStateFile(c.StateFile)
	missing := errors.Is(err, fs.ErrNotExist)
	if err != nil && !missing {
		return err
	}
	st, err := decodeStateFile(data, func(kind int, k [16]byte, t uint32) bool {
		switch {
		case kind == blockKnown && k == client.key:
			known, isKnown = t, true
		case kind == blockGrey && len(pos) == 3 && k == triplet:
			grey, isGrey = t, true
		}
		return true
	}, nil)
	if err != nil {
		return fmt.Errorf("%q: %w", c.StateFile, err)
	}
	if policy == nil {
		policy = st.policy
	}
	if policy == nil {
		p := Policy{
			KnownIPLifetime: ceilSeconds(defaultKnownIP),
			ResendWindow:    ceilSeconds(defaultResendWindow),
			MinResendDelay:  ceilSeconds(defaultMinDelay),
		}
		policy = &p
	}

	t := now()
	sec := uint32(max(t.Unix(), 0))
	when := func(unix uint32) string {
		at := time.Unix(int64(unix), 0)
		d := at.Sub(t).Round(time.Second)
		if d == 0 {
			return at.Format(time.DateTime) + " (now)"
		}
		if d < 0 {
			return fmt.Sprintf("%s (%s ago)", at.Format(time.DateTime), -d)
		}
		return fmt.Sprintf("%s (in %s)", at.Format(time.DateTime), d)
	}
	switch {
	case missing:
		fmt.Fprintf(w, "state file %s: not there yet\n", c.StateFile)
	case !st.written.IsZero():
		fmt.Fprintf(w, "state file %s: written %s\n", c.StateFile, when(uint32(st.written.Unix())))
	default:
		fmt.Fprintf(w, "state file %s (%s format)\n", c.StateFile, st.format)
	}

	switch {
	case client.isIP && wl.Contains(client.addr):
		fmt.Fprintf(w, "client %s: whitelisted in %s: accepted (01 01)\n", pos[0], c.Whitelist)
		return nil
	case isKnown && age(sec, known) < policy.KnownIPLifetime:
		fmt.Fprintf(w, "client %s: known IP, last seen %s: accepted (01 02) until %s, and each message moves that on\n",
			pos[0], when(known), when(known+policy.KnownIPLifetime))
		return nil
	case isKnown:
		fmt.Fprintf(w, "client %s: was a known IP, last seen %s; expired %s\n",
			pos[0], when(known), when(known+policy.KnownIPLifetime))
	default:
		fmt.Fprintf(w, "client %s: not a known IP; each triplet is greylisted until a retry passes\n", pos[0])
	}
	if len(pos) == 1 {
		return nil
	}

	what := fmt.Sprintf("triplet %s %s %s", pos[0], pos[1], pos[2])
	switch {
	case sender.null && looksLikeVERP([]byte(pos[2])):
		fmt.Fprintf(w, "%s: null sender and a VERP-looking recipient: accepted by the bounce rule (01 04)\n", what)
	case !isGrey:
		fmt.Fprintf(w, "%s: not seen; the next attempt is greylisted (00 01), and a retry from %s later passes\n",
			what, time.Duration(policy.MinResendDelay)*time.Second)
	case age(sec, grey) < policy.MinResendDelay:
		fmt.Fprintf(w, "%s: first seen %s; a retry now is too soon (00 02); it passes from %s until %s\n",
			what, when(grey), when(grey+policy.MinResendDelay), when(grey+policy.ResendWindow))
	case age(sec, grey) < policy.ResendWindow:
		fmt.Fprintf(w, "%s: first seen %s; a retry now passes (01 03) and makes the client a known IP, until %s\n",
			what, when(grey), when(grey+policy.ResendWindow))
	default:
		fmt.Fprintf(w, "%s: first seen %s; the resend window ended %s, so the next attempt starts over (00 03)\n",
			what, when(grey), when(grey+policy.ResendWindow))
	}
	return nil
}
