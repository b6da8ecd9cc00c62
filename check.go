package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strings"
)

// errProblemsFound is returned by check when it printed problems.
var errProblemsFound = errors.New("problems found")

// checkCommand is `greydaemon check [-c FILE] [flags] [ipaddr[:port]
// savefile]`: it reads the settings as the daemon would and checks them,
// the whitelist and the state file, without binding or writing anything.
// It prints every problem, with its file and line where it has one, and
// returns errProblemsFound; or it prints a summary and returns nil.
func checkCommand(args []string, stdout, stderr io.Writer) error {
	c, src, err := readCommandLine(args)
	if errors.Is(err, errUsage) || errors.Is(err, errHelp) {
		return err
	}
	var problems []string
	report := func(err error) {
		problems = append(problems, strings.Split(err.Error(), "\n")...)
	}
	if err != nil {
		report(err) // the config file: unreadable, bad TOML, unknown keys
	}
	for _, err := range c.problems() {
		var se *settingError
		if errors.As(err, &se) {
			report(fmt.Errorf("%s: %w", src.where(se.Key), err))
		}
	}

	summary := []string{fmt.Sprintf("listen %s", c.Listen)}
	if c.Whitelist != "" {
		var warnings []string
		wl, err := LoadWhitelist(c.Whitelist, func(w string) { warnings = append(warnings, w) })
		for _, w := range warnings {
			fmt.Fprintf(stderr, "greydaemon: warning: %s\n", w)
		}
		if err != nil {
			report(err)
		} else {
			summary = append(summary, fmt.Sprintf("whitelist %s (%d ranges)", c.Whitelist, wl.Len()))
		}
	}
	if c.User != "" {
		if _, err := user.Lookup(c.User); err != nil {
			report(fmt.Errorf("%s: user: %w", src.where("user"), err))
		}
	}
	if c.StateFile != "" {
		if s, err := checkStateFile(c.StateFile); err != nil {
			report(err)
		} else {
			summary = append(summary, s)
		}
	}

	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintf(stderr, "greydaemon: %s\n", p)
		}
		fmt.Fprintf(stderr, "greydaemon: check found %d problem(s)\n", len(problems))
		return errProblemsFound
	}
	fmt.Fprintf(stdout, "greydaemon: settings OK%s: %s\n", fromFile(&Settings{Source: src}), strings.Join(summary, "; "))
	return nil
}

// checkStateFile reads the state file at path without loading it and
// describes it, or says what is wrong with it.
func checkStateFile(path string) (string, error) {
	data, err := readStateFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		dir := filepath.Dir(path)
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return "", fmt.Errorf("state file %q: its directory %q does not exist", path, dir)
		}
		return fmt.Sprintf("no state file %s yet (it will be created)", path), nil
	}
	if err != nil {
		return "", err
	}
	st, err := decodeStateFile(data, func(int, [16]byte, uint32) bool { return true }, func(listKey, listEntry) bool { return true })
	if err != nil {
		return "", fmt.Errorf("state file %q: %w", path, err)
	}
	s := fmt.Sprintf("state file %s (%s, %d known IPs, %d grey triplets", path, st.format, st.known, st.grey)
	if st.lists > 0 {
		s += fmt.Sprintf(", %d greylistd entries", st.lists)
	}
	if st.bad > 0 {
		s += fmt.Sprintf(", %d unreadable lines skipped", st.bad)
	}
	return s + ")", nil
}
