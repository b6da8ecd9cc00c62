#!/usr/bin/env bash
# Reproduces the Performance figures of docs/performance.md on this machine: greydaemon
# beside the null responders under the same load, in one run, three times
# each, alternating; then the latency at half the rate, and memory per
# triplet. Prints medians. Everything runs on 127.0.0.1 and stops by itself.
#
#   bash scripts/perf.sh [seconds-per-run]
#   GREYDAEMON_PERL=/tmp/greydaemon.pl bash scripts/perf.sh   # with the Perl daemon in the same run
#   PIN=0 bash scripts/perf.sh      # let the scheduler place every process
#
# By default (PIN=1, with taskset and two or more cores) every server runs on
# core 0 and the load generator on core 1: a generator that shares the
# servers' core flattens every server to the generator's own speed, and the
# ratios move from run to run and machine to machine. Each server's CPU time
# per request (from /proc/PID/stat) is printed beside its rate.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
go build -o "$tmp/greydaemon" .
go build -o "$tmp/greyload" ./cmd/greyload

source scripts/perf-lib.sh
pin

"${server[@]}" "$tmp/greyload" null -listen 127.0.0.1:29991 2>/dev/null &
npid=$!
"${server[@]}" "$tmp/greyload" null -listen 127.0.0.1:29992 -batch 16 2>/dev/null &
bpid=$!
sleep 0.3

# A fresh daemon per run, with a 1.2 s minimum delay so greyload can make
# IPs known; decision log lines written (to /dev/null), as in production.
grey() {
  rm -f "$tmp/state"*
  "${server[@]}" "$tmp/greydaemon" -m 0.02 127.0.0.1:29990 "$tmp/state" >/dev/null 2>"$tmp/err" &
  local pid=$!
  sleep 0.3
  measure $pid 6 run -addr 127.0.0.1:29990 -duration "${secs}s" -warmup 2s "$@"
  kill $pid; wait $pid 2>/dev/null || true
}

# The Perl daemon, when GREYDAEMON_PERL names its source (John Levine's
# greydaemon.pl; it is not part of this repository), on the same load.
perl_daemon() {
  "${server[@]}" perl "$GREYDAEMON_PERL" -m 0.02 127.0.0.1:29993 "$tmp/perlsave" >/dev/null 2>&1 &
  local pid=$!
  sleep 0.5
  measure $pid 6 run -addr 127.0.0.1:29993 -duration "${secs}s" -warmup 2s
  kill $pid; wait $pid 2>/dev/null || true
  rm -f "$tmp/perlsave"*
}

: >"$tmp/g"; : >"$tmp/n"; : >"$tmp/b"; : >"$tmp/p"
for run in 1 2 3; do
  if [ -n "${GREYDAEMON_PERL:-}" ]; then
    perl_daemon | tee -a "$tmp/p.log" | rate >>"$tmp/p"
  fi
  grey | tee -a "$tmp/g.log" | rate >>"$tmp/g"
  measure $npid 6 run -addr 127.0.0.1:29991 -duration "${secs}s" -mix 100,0,0 | tee -a "$tmp/n.log" | rate >>"$tmp/n"
  measure $bpid 6 run -addr 127.0.0.1:29992 -duration "${secs}s" -mix 100,0,0 | tee -a "$tmp/b.log" | rate >>"$tmp/b"
done
g=$(median <"$tmp/g"); n=$(median <"$tmp/n"); b=$(median <"$tmp/b")
echo "--- throughput, medians of 3 (4 sockets x 4 in flight; mix 50% new, 30% retries, 20% known IPs)"
echo "greydaemon            $g requests/s"
echo "null responder        $n requests/s   (greydaemon at $((100 * g / n))%)"
echo "batched null responder $b requests/s   (greydaemon at $((100 * g / b))%)"
if [ -s "$tmp/p" ]; then
  p=$(median <"$tmp/p")
  echo "Perl greydaemon       $p requests/s   (greydaemon at $((100 * g / p))%)"
fi
# cpuof LOG: the server CPU per request of the median run in LOG.
cpuof() { sort -k2 -n "$1" | sed -n 2p | grep -o 'cpu/req [0-9.]*us'; }
echo "--- server CPU per answered request, the median runs"
echo "greydaemon $(cpuof "$tmp/g.log"); null responder $(cpuof "$tmp/n.log"); batched null responder $(cpuof "$tmp/b.log")"
[ -s "$tmp/p" ] && echo "Perl greydaemon $(cpuof "$tmp/p.log")"

half=$((g / 2))
echo "--- latency at half that rate ($half requests/s)"
grey -rate "$half"

echo "--- memory: 1,000,000 unique triplets, after a fill and after a restart"
rm -f "$tmp/state"*
"$tmp/greydaemon" 127.0.0.1:29990 "$tmp/state" >/dev/null 2>"$tmp/err" &
pid=$!
sleep 0.3
base=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
"$tmp/greyload" fill -addr 127.0.0.1:29990 -pid $pid -n 1000000
kill $pid; wait $pid 2>/dev/null || true # SIGTERM: saves
"$tmp/greydaemon" 127.0.0.1:29990 "$tmp/state" >/dev/null 2>"$tmp/err" &
pid=$!
for at in 1 10 30; do
  sleep $((at == 1 ? 1 : at == 10 ? 9 : 20))
  rss=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)
  echo "after a restart, ${at} s: RSS $rss KiB: $(( (rss - base) * 1024 / 1000000 )) bytes per triplet (over a fresh daemon's $base KiB)"
done
kill $pid; wait $pid 2>/dev/null || true
