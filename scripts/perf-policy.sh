#!/usr/bin/env bash
# The Postfix side's figures, in one run: greydaemon's policy service
# beside a null policy responder (answers action=DUNNO, nothing else) and,
# if Debian's postgrey is installed (apt-get install postgrey), postgrey,
# each driven three times, alternating, with 16 connections and one request
# in flight each, as Postfix's smtpd processes ask. Prints medians.
# Everything runs on 127.0.0.1 and stops by itself.
#
#   bash scripts/perf-policy.sh [seconds-per-run]
#   PIN=0 bash scripts/perf-policy.sh   # let the scheduler place every process
#
# By default (PIN=1, with taskset and two or more cores) the servers run on
# core 0 and the load generator on core 1, as in scripts/perf.sh, and each
# server's CPU time per answered request is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
tmp=$(mktemp -d)
chmod 755 "$tmp"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$tmp/pg.pid" ] && kill "$(cat "$tmp/pg.pid")" 2>/dev/null; rm -rf "$tmp"' EXIT
go build -o "$tmp/greydaemon" .
go build -o "$tmp/greyload" ./cmd/greyload
source scripts/perf-lib.sh
pin
cat >"$tmp/g.toml" <<CONF
listen = "127.0.0.1:29980"
state_file = "$tmp/state"
policy_listen = "127.0.0.1:29981"
CONF
"${server[@]}" "$tmp/greyload" nullpolicy -listen 127.0.0.1:29982 2>/dev/null &
npid=$!
sleep 0.3
# load ADDR PID: drives the server at ADDR and appends its CPU µs per request.
load() { measure "$2" 4 policy -addr "$1" -conns 16 -duration "${secs}s"; }
: >"$tmp/g"; : >"$tmp/n"; : >"$tmp/p"
for run in 1 2 3; do
  rm -f "$tmp/state"*
  "${server[@]}" "$tmp/greydaemon" -c "$tmp/g.toml" >/dev/null 2>"$tmp/err" &
  pid=$!
  sleep 0.4
  load 127.0.0.1:29981 $pid | tee -a "$tmp/g.log" | rate >>"$tmp/g"
  kill $pid; wait $pid 2>/dev/null || true
  load 127.0.0.1:29982 $npid | tee -a "$tmp/n.log" | rate >>"$tmp/n"
  if command -v postgrey >/dev/null && [ "$(id -u)" = 0 ]; then
    mkdir -p "$tmp/pg" && chown postgrey "$tmp/pg"
    "${server[@]}" postgrey --inet=127.0.0.1:29983 --dbdir="$tmp/pg" --user=postgrey --group=postgrey \
      --pidfile="$tmp/pg.pid" -d 2>/dev/null
    sleep 2
    load 127.0.0.1:29983 "$(cat "$tmp/pg.pid")" | tee -a "$tmp/p.log" | rate >>"$tmp/p"
    kill "$(cat "$tmp/pg.pid")"; sleep 0.5; rm -rf "$tmp/pg" "$tmp/pg.pid"
  fi
done
g=$(median <"$tmp/g"); n=$(median <"$tmp/n")
echo "--- policy decisions/s, medians of 3 (16 connections, one request in flight each, half new triplets)"
echo "greydaemon            $g   (at $((100 * g / n))% of the null responder)"
echo "null policy responder $n"
if [ -s "$tmp/p" ]; then
  p=$(median <"$tmp/p")
  echo "postgrey              $p   (greydaemon at $((g / p))x)"
fi
echo "--- greydaemon latency and CPU per request, the median run:"; sort -k2 -n "$tmp/g.log" | sed -n 2p
echo "--- the null responder's median run:"; sort -k2 -n "$tmp/n.log" | sed -n 2p
