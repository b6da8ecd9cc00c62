// Greydaemon is a greylisting daemon for qmail and Postfix, a drop-in
// replacement for John Levine's Perl greydaemon.
//
// Patched qmail-smtpd sends one UDP datagram per message at DATA with the
// client IP, the envelope sender and the recipients, and reads a 2-byte
// verdict: greylist (450) or accept. Greydaemon takes the Perl daemon's
// command line and save file, answers as it does (see PROTOCOL.md), and keeps
// its state in a sharded in-memory table that it snapshots to disk. It also
// answers Postfix's policy delegation protocol on the same table.
//
// Usage:
//
//	greydaemon [-d] [-c config.toml] [-u user] [-w whitelist] [-s minutes]
//	           [-t days] [-g hours] [-m minutes] [ipaddr[:port] savefile]
//	greydaemon check [-c config.toml] [flags] [ipaddr[:port] savefile]
//	greydaemon lookup [-c config.toml | savefile] IP [SENDER RECIPIENT]
//	greydaemon import-redis [-c config.toml] [flags] savefile
//	greydaemon dump FILE
//	greydaemon version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() { os.Exit(runMain(os.Args[1:])) }

// runMain is main without the exit: it readies the process, runs the
// command line args, and returns the exit code. Tests that run the daemon
// in a child process call it too.
func runMain(args []string) int {
	// A write to a closed pipe must fail, not kill the daemon with its
	// state unsaved (`greydaemon ... | true`): with SIGPIPE ignored, the
	// write returns EPIPE and the log counts the line as lost. (A closed
	// descriptor 0, 1 or 2 needs nothing: the Go runtime opens /dev/null
	// on it at start, so no socket or file can take its number.)
	signal.Ignore(syscall.SIGPIPE)
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(signals)
	err := run(args, os.Stdout, os.Stderr, signals)
	return exitCode(err, os.Stdout, os.Stderr)
}

// exitCode reports err the way the command line expects and returns the
// exit code: 0 for none, 2 for a command line that cannot be understood
// (with the usage), 1 for anything else.
func exitCode(err error, stdout, stderr io.Writer) int {
	var status exitStatus
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errHelp):
		fmt.Fprint(stdout, usageText)
		return 0
	case errors.Is(err, errProblemsFound):
		return 1 // check has printed them
	case errors.As(err, &status):
		return int(status)
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "greydaemon: error: %v\n%s", err, usageText)
		return 2
	}
	msg := fmt.Sprintf("greydaemon: error: %v\n", err)
	if werr := writeWithin(stderr, msg, logFlushTimeout); werr != nil {
		writeWithin(stdout, msg, logFlushTimeout) // stderr is gone or stuck: say it where it can be seen
	}
	return 1
}

// writeWithin writes msg to w, giving up after timeout: a stream nobody
// reads must not keep a daemon that has stopped from exiting.
func writeWithin(w io.Writer, msg string, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() {
		_, err := io.WriteString(w, msg)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("not written within %v", timeout)
	}
}

// run runs greydaemon with the command-line arguments args: a subcommand,
// or the daemon until a stop signal arrives on signals.
func run(args []string, stdout, stderr io.Writer, signals <-chan os.Signal) error {
	if len(args) > 0 {
		switch args[0] {
		case "dump":
			if len(args) != 2 {
				return fmt.Errorf("%w: dump takes one file", errUsage)
			}
			return dumpFile(args[1], stdout)
		case "check":
			return checkCommand(args[1:], stdout, stderr)
		case "lookup":
			return lookupCommand(args[1:], stdout, nowFunc)
		case "import-redis":
			return importRedisCommand(args[1:], stdout, nowFunc)
		case "import-greylistd":
			return importGreylistdCommand(args[1:], stdout, nowFunc)
		case "greylist":
			return greylistCommand(args[1:], stdout, stderr)
		case "version":
			fmt.Fprintln(stdout, versionLine())
			return nil
		case "help", "-help", "--help", "-h":
			return errHelp
		}
	}
	// Read the command line once before starting, so that a usage error
	// is reported as one.
	if _, _, err := readCommandLine(args); err != nil {
		return err
	}
	d := newDaemon(func() (*Settings, error) { return parseCommandLine(args) }, stdout, stderr)
	d.signals = signals
	d.notify = systemdNotify
	d.ownsProcess = true
	return d.run(context.Background())
}
