package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/redis/rueidis"
	"golang.org/x/sys/unix"
)

// errProblemsFound is returned by check when it printed problems.
var errProblemsFound = errors.New("problems found")

// checkCommand is `greydaemon check [-c FILE] [flags] [ipaddr[:port]
// savefile]`: it reads the settings as the daemon would and checks them,
// the whitelist and the state file, without binding or writing anything.
// It prints every problem, with its file and line where it has one, and
// returns errProblemsFound; or it prints a summary and returns nil.
func checkCommand(args []string, stdout, stderr io.Writer) error {
	pingRedis := slices.ContainsFunc(args, func(a string) bool { return a == "-redis" || a == "--redis" })
	args = slices.DeleteFunc(slices.Clone(args), func(a string) bool { return a == "-redis" || a == "--redis" })
	c, src, err := readCommandLine(args)
	if errors.Is(err, errUsage) || errors.Is(err, errHelp) {
		return err
	}
	ck := &checker{c: c, src: src, warn: stderr}
	if err != nil {
		ck.report(err) // the config file: unreadable, bad TOML, unknown keys
	}
	for _, err := range c.problems() {
		var se *settingError
		if errors.As(err, &se) {
			ck.report(fmt.Errorf("%s: %w", src.where(se.Key), err))
		}
	}
	ck.files()
	if pingRedis {
		ck.redis()
	}
	if len(ck.problems) > 0 {
		for _, p := range ck.problems {
			fmt.Fprintf(stderr, "greydaemon: %s\n", p)
		}
		fmt.Fprintf(stderr, "greydaemon: check found %d problem(s)\n", len(ck.problems))
		return errProblemsFound
	}
	summary := append([]string{fmt.Sprintf("listen %s", c.Listen)}, ck.summary...)
	summary = append(summary, c.frontEndSummary()...)
	fmt.Fprintf(stdout, "greydaemon: settings OK%s: %s\n", fromFile(&Settings{Source: src}), strings.Join(summary, "; "))
	return nil
}

// A checker collects what check finds: problems, and what it read for the
// summary.
type checker struct {
	c        Config
	src      Source
	warn     io.Writer // for the whitelist's warnings
	problems []string
	summary  []string
}

// report records a problem (each line of err as one).
func (ck *checker) report(err error) {
	ck.problems = append(ck.problems, strings.Split(err.Error(), "\n")...)
}

// files checks what the daemon reads and writes at start, as it would:
// as the -u user when started as root. The user, the whitelist, the state
// file and its directory, and the unix sockets' directories.
func (ck *checker) files() {
	c, src := ck.c, ck.src
	owner, err := fileOwnerFor(c.User)
	if err != nil {
		ck.report(fmt.Errorf("%s: user: %w", src.where("user"), err))
	}
	if c.User != "" && owner == nil {
		if _, err := user.Lookup(c.User); err != nil {
			ck.report(fmt.Errorf("%s: user: %w", src.where("user"), err))
		}
	}
	if c.Whitelist != "" {
		ck.whitelist(owner)
	}
	if c.StateFile != "" {
		if err := checkDirWritable(c.StateFile, "state file", src.where("state_file"), owner); err != nil {
			ck.report(err)
		} else if s, err := checkStateFile(c.StateFile); err != nil {
			ck.report(err)
		} else {
			ck.summary = append(ck.summary, s)
		}
	}
	for _, sock := range []struct{ key, path string }{
		{"greylistd_listen", c.GreylistdListen},
		{"policy_listen", strings.TrimPrefix(c.PolicyListen, "unix:")},
		{"milter_listen", strings.TrimPrefix(c.MilterListen, "unix:")},
	} {
		if strings.HasPrefix(sock.path, "/") {
			if err := checkDirWritable(sock.path, "socket", src.where(sock.key)+": "+sock.key, owner); err != nil {
				ck.report(err)
			}
		}
	}
}

// redis checks that the Redis the settings name answers, as -redis asks.
func (ck *checker) redis() {
	set, err := resolve(ck.c, ck.src)
	if err != nil || !set.usesRedis() {
		ck.report(errors.New("-redis: the settings name no Redis (redis_url or redis_sentinels)"))
		return
	}
	opt, err := redisOption(set)
	if err != nil {
		ck.report(fmt.Errorf("%s: %w", ck.src.where("redis_url"), err))
		return
	}
	opt.Dialer.Timeout = 2 * time.Second
	client, err := rueidis.NewClient(opt)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err = client.Do(ctx, client.B().Ping().Build()).Error()
		cancel()
		client.Close()
	}
	if err != nil {
		ck.report(fmt.Errorf("redis: cannot reach it: %w", err))
		return
	}
	ck.summary = append(ck.summary, "redis answers PING")
}

// whitelist reads the whitelist as owner (nil: this process) would.
func (ck *checker) whitelist(owner *fileOwner) {
	var warnings []string
	var wl *IPRanges
	err := asOwner(owner, 0o022, func() (err error) {
		wl, err = LoadWhitelist(ck.c.Whitelist, func(w string) { warnings = append(warnings, w) })
		return err
	})
	for _, w := range warnings {
		fmt.Fprintf(ck.warn, "greydaemon: warning: %s\n", w)
	}
	if err != nil {
		ck.report(err)
		return
	}
	ck.summary = append(ck.summary, fmt.Sprintf("whitelist %s (%d ranges)", ck.c.Whitelist, wl.Len()))
}

// checkDirWritable checks that the directory of the file at path (what
// says what the file is; where, where the setting came from) exists and
// that owner (nil: this process) may create files in it, as the daemon
// will.
func checkDirWritable(path, what, where string, owner *fileOwner) error {
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%s: the directory of %s %q: %w; create it: mkdir -p %q", where, what, path, err, dir)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s: the directory of %s %q, %q, is not a directory", where, what, path, dir)
	}
	err = asOwner(owner, 0o022, func() error {
		return unix.Faccessat(unix.AT_FDCWD, dir, unix.W_OK|unix.X_OK, unix.AT_EACCESS)
	})
	if err != nil {
		who := fmt.Sprintf("user %s (uid %d)", userName(), os.Geteuid())
		name := userName()
		if owner != nil {
			who, name = fmt.Sprintf("user %s (uid %d)", owner.name, owner.uid), owner.name
		}
		return fmt.Errorf("%s: cannot create files in %q, the directory of %s %q, as %s: %w; make it writable by that user (chown %s %q)",
			where, dir, what, path, who, err, name, dir)
	}
	return nil
}

// frontEndSummary describes the front ends and the store the settings turn
// on, for check's summary.
func (c Config) frontEndSummary() []string {
	var s []string
	if c.PolicyListen != "" {
		s = append(s, fmt.Sprintf("postfix policy %s (at most %d connections)", c.PolicyListen, c.PolicyMaxConnections))
	}
	if c.MilterListen != "" {
		s = append(s, fmt.Sprintf("milter %s (at most %d connections)", c.MilterListen, c.MilterMaxConnections))
	}
	if c.GreylistdListen != "" {
		group := ""
		if c.GreylistdGroup != "" {
			group = ", group " + c.GreylistdGroup
		}
		s = append(s, fmt.Sprintf("greylistd socket %s (mode %s%s)", c.GreylistdListen, c.GreylistdSocketMode, group))
	}
	if c.MetricsListen != "" {
		s = append(s, "metrics http://"+c.MetricsListen+"/metrics")
	}
	switch {
	case c.RedisURL != "":
		s = append(s, fmt.Sprintf("redis %s (fallback %s)", redactURL(c.RedisURL), c.RedisFallback))
	case len(c.RedisSentinels) > 0:
		s = append(s, fmt.Sprintf("redis master %q via sentinels %s (fallback %s)", c.RedisMaster, strings.Join(c.RedisSentinels, ", "), c.RedisFallback))
	}
	if len(c.Allow) > 0 {
		s = append(s, "allow "+strings.Join(c.Allow, ", "))
	}
	return s
}

// redactURL returns u with any password replaced by "xxxxx".
func redactURL(u string) string {
	if parsed, err := url.Parse(u); err == nil {
		return parsed.Redacted()
	}
	return u
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
