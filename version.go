package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// buildInfo describes the running binary, from what the Go toolchain
// recorded in it.
type buildInfo struct {
	version  string // module version, or "(devel)"
	revision string // VCS revision, with "+dirty" for uncommitted changes; or "unknown"
	time     string // VCS commit time, or ""
}

// readBuildInfo returns the binary's build information.
func readBuildInfo() buildInfo {
	b := buildInfo{version: "(devel)", revision: "unknown"}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if v := info.Main.Version; v != "" {
		b.version = v
	}
	dirty := false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			b.revision = s.Value
		case "vcs.time":
			b.time = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if dirty && b.revision != "unknown" {
		b.revision += "+dirty"
	}
	return b
}

// versionLine returns what `greydaemon version` prints.
func versionLine() string {
	b := readBuildInfo()
	s := fmt.Sprintf("greydaemon %s (revision %s", b.version, b.revision)
	if b.time != "" {
		s += ", " + b.time
	}
	return s + ", " + runtime.Version() + ")"
}
