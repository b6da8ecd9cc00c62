package main

import "time"

// Stats is a picture of everything the daemon counts, gathered by one call
// to daemon.UpdateStats. The metrics endpoint and the stop line read it;
// the counters are totals since start.
type Stats struct {
	FrontEnds []FrontEndStats // the qmail front end first

	KnownIPs, GreyTriplets int    // entries held now
	ListEntries            int    // greylistd entries held now
	MaxEntries             int    // the cap on entries
	Evictions              uint64 // entries dropped to respect the cap
	Expirations            uint64 // entries dropped by sweeps because they expired
	FutureTimesClamped     uint64 // entry times found in the future and set to now
	GreyUnretried          uint64 // grey triplets whose time ended without a retry that passed

	Saves, SaveFailures uint64
	LastSave            time.Time     // when the last good save ended; zero if none yet
	LastSaveDuration    time.Duration // how long it took
	LastSaveBytes       int64         // the snapshot's size
	LoadDuration        time.Duration // reading the state file at start

	Reloads, ReloadFailures uint64
	BadLinesNotLogged       uint64 // malformed-request log lines left out by the rate limit
	StdoutLinesLost         uint64 // decision lines that could not be written
	StderrLinesLost         uint64 // messages that could not be written

	Redis                                bool   // decisions go to Redis
	RedisUp                              bool   // the last call answered
	RedisCalls, RedisFailures, Fallbacks uint64 // calls, failed calls, requests decided by redis_fallback

	// RetryDelays is the histogram of the delays from a first attempt to
	// the retry that passed: cumulative counts by upper bound in seconds,
	// their count and their sum.
	RetryDelays     map[float64]uint64
	RetryDelayCount uint64
	RetryDelaySum   float64

	// ListAnswers counts the greylistd socket's answers, by command and
	// then by the list answered (0: none); nil without the socket.
	ListAnswers [][]uint64
}

// FrontEndStats counts what one front end did.
type FrontEndStats struct {
	Name        string
	Requests    uint64              // requests received
	Malformed   uint64              // requests that could not be decided and got no reply
	Refused     uint64              // requests from outside the allow list, dropped
	Replies     uint64              // replies sent
	ReadErrors  uint64              // failed reads
	WriteErrors uint64              // replies that could not be sent
	Verdicts    [numVerdicts]uint64 // by verdict, for a front end that Decides
	Decides     bool                // it answers with qmail's verdicts (qmail, Postfix, milter)

	// Unchecked counts recipients passed without a decision, by why (the
	// unchecked... constants), for a front end that PassesUnchecked.
	Unchecked       [numUnchecked]uint64
	PassesUnchecked bool // the milter's
}

// Why a recipient passed without a decision.
const (
	uncheckedAuthenticated = iota // the client authenticated (SMTP AUTH)
	uncheckedNoAddress            // the client has no IP address: a local submission
	numUnchecked
)

// uncheckedReasons names them for the metrics.
var uncheckedReasons = [numUnchecked]string{"authenticated", "no_client_address"}

// A statsReporter is a front end that counts what it does.
type statsReporter interface {
	UpdateStats(st *FrontEndStats)
}
