package main

import (
	sddaemon "github.com/coreos/go-systemd/v22/daemon"
)

// systemdNotify sends state to the service manager through $NOTIFY_SOCKET
// (sd_notify). Without $NOTIFY_SOCKET it does nothing.
func systemdNotify(state string) error {
	_, err := sddaemon.SdNotify(false, state)
	return err
}

// monotonicUsec returns the MONOTONIC_USEC= line that systemd wants with
// RELOADING=1.
func monotonicUsec() string { return sddaemon.SdNotifyMonotonicUsec() }
