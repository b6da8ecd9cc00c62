package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// This file is the greylist subcommand: the counterpart of greylistd's
// greylist tool, which sends one request to the greylistd socket and prints
// the answer.

// defaultListSocket is where the greylist subcommand looks for the socket
// when neither -c nor -socket says.
const defaultListSocket = "/run/greydaemon/greylistd.sock"

// An exitStatus is an error that only sets the exit code: the command has
// said what there was to say.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// listExitCodes maps the first word of an answer to the greylist tool's
// exit code; any other word exits 0.
var listExitCodes = map[string]int{
	"error:": 255, // greylist's sys.exit(-1)
	"white":  0,
	"grey":   1,
	"black":  2,
	"true":   0,
	"false":  1,
}

// greylistCommand runs `greydaemon greylist [-c config | -socket path]
// command [options] data...`: it sends the words after the flags, joined by
// spaces, to the greylistd socket, prints the answer and a newline, and
// exits as greylistd's greylist tool does: 0 for white or true, 1 for grey
// or false, 2 for black, 255 for an error answer, 1 when there is no answer
// or the socket cannot be reached.
func greylistCommand(args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("greylist", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	configPath := flags.String("c", "", "")
	socket := flags.String("socket", "", "")
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return fmt.Errorf("%w: greylist: %v", errUsage, err)
	}
	words := flags.Args()
	if len(words) == 0 {
		return fmt.Errorf("%w: greylist: no action given (one of %s)", errUsage, strings.Join(listCommandNames[:], ", "))
	}
	known := false
	for _, name := range listCommandNames {
		known = known || strings.EqualFold(words[0], name)
	}
	if !known {
		return fmt.Errorf("%w: greylist: invalid action %q (one of %s)", errUsage, words[0], strings.Join(listCommandNames[:], ", "))
	}
	path := *socket
	if path == "" && *configPath != "" {
		c := defaultConfig()
		if err := loadConfigFile(&c, *configPath); err != nil {
			return err
		}
		if c.GreylistdListen == "" {
			return fmt.Errorf("%s sets no greylistd_listen: the greylistd socket is off", *configPath)
		}
		path = c.GreylistdListen
	}
	if path == "" {
		path = defaultListSocket
	}
	answer, err := askListSocket(path, strings.Join(words, " "), listTimeout)
	if err != nil {
		fmt.Fprintf(stderr, "greydaemon greylist: %v\n", err)
		return exitStatus(1)
	}
	fmt.Fprintf(stdout, "%s\n", answer)
	first, _, _ := bytes.Cut(bytes.TrimSpace(answer), []byte(" "))
	if len(first) == 0 {
		fmt.Fprintln(stderr, "greydaemon greylist: no answer from the greylistd socket")
		return exitStatus(1)
	}
	if code, ok := listExitCodes[string(first)]; ok && code != 0 {
		return exitStatus(code)
	}
	return nil
}

// askListSocket sends request to the greylistd socket at path and returns
// the answer, everything the server writes before it closes.
func askListSocket(path, request string, timeout time.Duration) ([]byte, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("cannot connect to %q: %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, request); err != nil {
		return nil, fmt.Errorf("cannot send to %q: %w", path, err)
	}
	answer, err := io.ReadAll(io.LimitReader(c, 1<<20))
	if err != nil {
		return answer, fmt.Errorf("cannot read the answer from %q: %w", path, err)
	}
	return answer, nil
}
