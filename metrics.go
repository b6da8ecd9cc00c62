package main

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// A metricsServer serves the daemon's counters as Prometheus text at
// /metrics. It is a front end like the qmail server: bound at open, served
// until shutdown.
//
// The request path never calls client_golang: the front ends keep plain
// atomic counters, and a scrape gathers them with one UpdateStats call and
// turns them into constant metrics.
type metricsServer struct {
	ln  *guardedListener
	srv *http.Server
}

// metricsMaxConnections caps the endpoint's open connections: a scraper
// needs one, and nobody may use up the daemon's file descriptors.
const metricsMaxConnections = 16

// listenMetrics binds the metrics endpoint to hostport; a scrape calls
// updateStats for the numbers. Connections from outside the allow list, and
// beyond metricsMaxConnections, are closed at once.
func listenMetrics(hostport string, updateStats func(*Stats)) (*metricsServer, error) {
	ln, err := net.Listen("tcp", hostport)
	if err != nil {
		return nil, fmt.Errorf("cannot listen on %s for metrics: %w", hostport, err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		&statsCollector{updateStats: updateStats},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "greydaemon: metrics at /metrics")
	})
	return &metricsServer{ln: newGuardedListener(ln, metricsMaxConnections), srv: &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       30 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0),
	}}, nil
}

// setAllow sets the networks whose scrapes are answered; nil: all.
func (m *metricsServer) setAllow(allow *IPRanges) { m.ln.allow.Store(allow) }

// Name returns "metrics".
func (m *metricsServer) Name() string { return "metrics" }

// Addr returns the address the endpoint answers on.
func (m *metricsServer) Addr() net.Addr { return m.ln.Addr() }

// Serve serves scrapes until Close.
func (m *metricsServer) Serve() error {
	if err := m.srv.Serve(m.ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Close stops the endpoint.
func (m *metricsServer) Close() error { return m.srv.Close() }

// The metrics' descriptions. Every name starts with greydaemon_ and
// follows Prometheus naming: _total for counters, base units.
var (
	descRequests = prometheus.NewDesc("greydaemon_requests_total",
		"Requests received, by front end.", []string{"frontend"}, nil)
	descDecisions = prometheus.NewDesc("greydaemon_decisions_total",
		"Requests decided, by front end, action (accept or greylist), reason and qmail reply code.",
		[]string{"frontend", "action", "reason", "reply"}, nil)
	descMalformed = prometheus.NewDesc("greydaemon_malformed_requests_total",
		"Malformed requests, which get no reply, by front end.", []string{"frontend"}, nil)
	descUnchecked = prometheus.NewDesc("greydaemon_unchecked_total",
		"Recipients passed without a decision or a table entry, by front end and why: the client authenticated, or has no IP address.",
		[]string{"frontend", "reason"}, nil)
	descRefused = prometheus.NewDesc("greydaemon_refused_requests_total",
		"Requests from networks outside the allow list, dropped without a reply, by front end.", []string{"frontend"}, nil)
	descReplies = prometheus.NewDesc("greydaemon_replies_total",
		"Replies sent, by front end.", []string{"frontend"}, nil)
	descIOErrors = prometheus.NewDesc("greydaemon_io_errors_total",
		"Failed socket reads and writes, by front end and operation.", []string{"frontend", "op"}, nil)
	descEntries = prometheus.NewDesc("greydaemon_entries",
		"Entries held, by table (known_ip, grey, or greylistd for the greylistd socket's data strings).", []string{"table"}, nil)
	descMaxEntries = prometheus.NewDesc("greydaemon_max_entries",
		"The cap on entries held (all tables together).", nil, nil)
	descEvictions = prometheus.NewDesc("greydaemon_evictions_total",
		"Entries dropped to keep under the cap.", nil, nil)
	descExpirations = prometheus.NewDesc("greydaemon_expirations_total",
		"Entries dropped by the sweeper because they expired.", nil, nil)
	descClamped = prometheus.NewDesc("greydaemon_future_times_clamped_total",
		"Entry times found more than a minute in the future (a clock that stepped back, a save file from a host ahead) and set to now.", nil, nil)
	descSaves = prometheus.NewDesc("greydaemon_snapshots_total",
		"Snapshots written.", nil, nil)
	descSaveFailures = prometheus.NewDesc("greydaemon_snapshot_failures_total",
		"Snapshots that failed; the previous snapshot stays.", nil, nil)
	descSaveDuration = prometheus.NewDesc("greydaemon_snapshot_duration_seconds",
		"How long the last good snapshot took to write.", nil, nil)
	descSaveSize = prometheus.NewDesc("greydaemon_snapshot_size_bytes",
		"The size of the last good snapshot.", nil, nil)
	descSaveTime = prometheus.NewDesc("greydaemon_snapshot_last_success_timestamp_seconds",
		"When the last good snapshot was written, in Unix seconds; 0 before the first.", nil, nil)
	descLoad = prometheus.NewDesc("greydaemon_load_duration_seconds",
		"How long reading the state file took at start.", nil, nil)
	descReloads = prometheus.NewDesc("greydaemon_reloads_total",
		"Reloads of the settings (SIGHUP), by result (success or failure).", []string{"result"}, nil)
	descLogDropped = prometheus.NewDesc("greydaemon_log_lines_dropped_total",
		"Malformed-request log lines left out by the rate limit.", nil, nil)
	descLogLost = prometheus.NewDesc("greydaemon_log_lines_lost_total",
		"Log lines that could not be written (a closed pipe, a full disk), by stream.", []string{"stream"}, nil)
	descUnretried = prometheus.NewDesc("greydaemon_grey_unretried_total",
		"Grey triplets whose resend window ended (expired, or restarted as stale) without a retry that passed: mail greylisting kept out, most of it spam. Triplets first seen since the daemon started.", nil, nil)
	descRetryDelay = prometheus.NewDesc("greydaemon_retry_delay_seconds",
		"Delay from a triplet's first attempt to the retry that passed: what greylisting costs the mail that gets through.", nil, nil)
	descListAnswers = prometheus.NewDesc("greydaemon_greylistd_answers_total",
		"Answers of the greylistd socket, by command and by the list answered (none: unseen, or not found).", []string{"command", "list"}, nil)
	descRedisUp = prometheus.NewDesc("greydaemon_redis_up",
		"1 if Redis answered the last call, 0 if decisions go to redis_fallback; absent without Redis.", nil, nil)
	descRedisCalls = prometheus.NewDesc("greydaemon_redis_calls_total",
		"Decisions asked of Redis, by result (ok or error).", []string{"result"}, nil)
	descFallbacks = prometheus.NewDesc("greydaemon_redis_fallback_decisions_total",
		"Requests decided by redis_fallback because Redis could not answer.", nil, nil)
	descBuild = prometheus.NewDesc("greydaemon_build_info",
		"Always 1; the labels describe the running binary.", []string{"version", "revision", "goversion"}, nil)
)

// A statsCollector turns the daemon's Stats into metrics at scrape time.
type statsCollector struct {
	updateStats func(*Stats)
}

// Describe sends every description the collector uses.
func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descRequests, descDecisions, descUnchecked, descMalformed, descRefused, descReplies, descIOErrors,
		descListAnswers, descRetryDelay, descUnretried, descEntries, descMaxEntries, descEvictions, descExpirations, descClamped,
		descSaves, descSaveFailures, descSaveDuration, descSaveSize, descSaveTime, descLoad,
		descReloads, descLogDropped, descLogLost, descRedisUp, descRedisCalls, descFallbacks, descBuild,
	} {
		ch <- d
	}
}

// Collect gathers the daemon's Stats once and sends them as metrics.
func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	var st Stats
	c.updateStats(&st)
	e := metricEmitter(ch)
	for _, fe := range st.FrontEnds {
		e.frontEnd(&fe)
	}
	e.table(&st)
	e.counter(descSaves, st.Saves)
	e.counter(descSaveFailures, st.SaveFailures)
	e.gauge(descSaveDuration, st.LastSaveDuration.Seconds())
	e.gauge(descSaveSize, float64(st.LastSaveBytes))
	lastSave := 0.0
	if !st.LastSave.IsZero() {
		lastSave = float64(st.LastSave.UnixNano()) / 1e9
	}
	e.gauge(descSaveTime, lastSave)
	e.gauge(descLoad, st.LoadDuration.Seconds())
	e.counter(descReloads, st.Reloads, "success")
	e.counter(descReloads, st.ReloadFailures, "failure")
	e.counter(descLogDropped, st.BadLinesNotLogged)
	e.counter(descLogLost, st.StdoutLinesLost, "stdout")
	e.counter(descLogLost, st.StderrLinesLost, "stderr")
	ch <- prometheus.MustNewConstHistogram(descRetryDelay, st.RetryDelayCount, st.RetryDelaySum, st.RetryDelays)
	e.listAnswers(st.ListAnswers)
	if st.Redis {
		up := 0.0
		if st.RedisUp {
			up = 1
		}
		e.gauge(descRedisUp, up)
		e.counter(descRedisCalls, st.RedisCalls-st.RedisFailures, "ok")
		e.counter(descRedisCalls, st.RedisFailures, "error")
		e.counter(descFallbacks, st.Fallbacks)
	}
	b := readBuildInfo()
	e.gauge(descBuild, 1, b.version, b.revision, runtime.Version())
}

// A metricEmitter sends constant metrics to a collector's channel.
type metricEmitter chan<- prometheus.Metric

// counter sends a counter.
func (e metricEmitter) counter(d *prometheus.Desc, v uint64, labels ...string) {
	e <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
}

// gauge sends a gauge.
func (e metricEmitter) gauge(d *prometheus.Desc, v float64, labels ...string) {
	e <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

// frontEnd sends one front end's counters, and its decisions by verdict if
// it answers with qmail's verdicts.
func (e metricEmitter) frontEnd(fe *FrontEndStats) {
	e.counter(descRequests, fe.Requests, fe.Name)
	e.counter(descMalformed, fe.Malformed, fe.Name)
	e.counter(descRefused, fe.Refused, fe.Name)
	e.counter(descReplies, fe.Replies, fe.Name)
	e.counter(descIOErrors, fe.ReadErrors, fe.Name, "read")
	e.counter(descIOErrors, fe.WriteErrors, fe.Name, "write")
	if fe.PassesUnchecked {
		for i, reason := range uncheckedReasons {
			e.counter(descUnchecked, fe.Unchecked[i], fe.Name, reason)
		}
	}
	if !fe.Decides {
		return
	}
	for i, v := range verdicts {
		action := "greylist"
		if v.Accepts() {
			action = "accept"
		}
		e.counter(descDecisions, fe.Verdicts[i], fe.Name, action, v.Reason(), fmt.Sprintf("%04x", uint16(v)))
	}
}

// table sends the table's gauges and counters.
func (e metricEmitter) table(st *Stats) {
	e.gauge(descEntries, float64(st.KnownIPs), "known_ip")
	e.gauge(descEntries, float64(st.GreyTriplets), "grey")
	e.gauge(descEntries, float64(st.ListEntries), "greylistd")
	e.gauge(descMaxEntries, float64(st.MaxEntries))
	e.counter(descEvictions, st.Evictions)
	e.counter(descExpirations, st.Expirations)
	e.counter(descClamped, st.FutureTimesClamped)
	e.counter(descUnretried, st.GreyUnretried)
}

// listAnswers sends the greylistd socket's answers by command and list,
// for the combinations that can happen; nothing without the socket.
func (e metricEmitter) listAnswers(answers [][]uint64) {
	if answers == nil {
		return
	}
	for _, cmd := range []listCommand{cmdUpdate, cmdCheck, cmdAdd, cmdDelete, cmdStatus} {
		for list := range listBlack + 1 {
			if list == 0 && cmd != cmdDelete && cmd != cmdStatus {
				continue // update, check and add always answer a list
			}
			name := "none"
			if list != 0 {
				name = list.String()
			}
			e.counter(descListAnswers, answers[cmd][list], listCommandNames[cmd], name)
		}
	}
}
