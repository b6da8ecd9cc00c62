#!/usr/bin/env bash
# The milter side's figures, in one run: greydaemon's milter beside two null
# milters (github.com/d--j/go-milter's NoOpMilter, answering "continue" to
# everything: one taking every event as a milter that asks for nothing
# does, one -lean, asking for what greydaemon asks), each driven three
# times, alternating, by `greyload milter`: CLIENTS conversations at once,
# each a connection, the negotiation, connect, HELO, MAIL, one RCPT, abort
# and quit, as an MTA holds for one SMTP session. Prints medians.
# Everything runs in a temporary directory and stops by itself.
#
#   bash scripts/perf-milter.sh [seconds-per-run] [clients]
#   PIN=0 bash scripts/perf-milter.sh   # let the scheduler place every process
#
# By default (PIN=1, with taskset and two or more cores) the servers run on
# core 0 and the load generator on core 1, as in scripts/perf.sh, and each
# server's CPU time per conversation is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
clients=${2:-16}
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
go build -o "$tmp/greydaemon" .
go build -o "$tmp/greyload" ./cmd/greyload
source scripts/perf-lib.sh
pin
cat >"$tmp/g.toml" <<CONF
listen = "127.0.0.1:29980"
state_file = "$tmp/state"
milter_listen = "127.0.0.1:29981"
CONF
"${server[@]}" "$tmp/greyload" nullmilter -listen 127.0.0.1:29982 2>/dev/null &
npid=$!
"${server[@]}" "$tmp/greyload" nullmilter -lean -listen 127.0.0.1:29983 2>/dev/null &
lpid=$!
sleep 0.3
# load ADDR PID: drives the milter at ADDR and appends its CPU µs per
# conversation.
load() { measure "$2" 4 milter -addr "$1" -clients "$clients" -duration "${secs}s"; }
: >"$tmp/g"; : >"$tmp/n"; : >"$tmp/l"
for run in 1 2 3; do
  rm -f "$tmp/state"*
  "${server[@]}" "$tmp/greydaemon" -c "$tmp/g.toml" >/dev/null 2>"$tmp/err" &
  pid=$!
  sleep 0.4
  load 127.0.0.1:29981 $pid | tee -a "$tmp/g.log" | rate >>"$tmp/g"
  kill $pid; wait $pid 2>/dev/null || true
  load 127.0.0.1:29982 $npid | tee -a "$tmp/n.log" | rate >>"$tmp/n"
  load 127.0.0.1:29983 $lpid | tee -a "$tmp/l.log" | rate >>"$tmp/l"
done
g=$(median <"$tmp/g"); n=$(median <"$tmp/n"); l=$(median <"$tmp/l")
echo "--- milter conversations/s, medians of 3 ($clients at once, half with a new triplet)"
echo "greydaemon          $g   (at $((100 * g / n))% of the null milter, $((100 * g / l))% of the lean one)"
echo "null milter         $n"
echo "null milter, lean   $l"
echo "--- greydaemon latency and CPU per conversation, the median run:"; sort -k2 -n "$tmp/g.log" | sed -n 2p
echo "--- the null milter's median run:"; sort -k2 -n "$tmp/n.log" | sed -n 2p
echo "--- the lean null milter's median run:"; sort -k2 -n "$tmp/l.log" | sed -n 2p
