#!/usr/bin/env bash
# The Exim side's figures, in one run: greydaemon's greylistd socket beside
# a null responder (answers "false" to every connection, nothing else) and,
# if Debian's greylistd is installed (apt-get install --no-install-recommends
# greylistd), greylistd itself, each driven three times, alternating, by
# `greyload greylistd`: CLIENTS loops, one connection per request as Exim's
# readsocket makes. Prints medians. Everything runs in a temporary directory
# and stops by itself.
#
#   bash scripts/perf-greylistd.sh [seconds-per-run] [clients]
#   PIN=0 bash scripts/perf-greylistd.sh   # let the scheduler place every process
#
# By default (PIN=1, with taskset and two or more cores) the servers run on
# core 0 and the load generator on core 1, as in scripts/perf.sh, and each
# server's CPU time per answered request is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
clients=${2:-4}
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
go build -o "$tmp/greydaemon" .
go build -o "$tmp/greyload" ./cmd/greyload
source scripts/perf-lib.sh
pin
cat >"$tmp/g.toml" <<CONF
listen = "127.0.0.1:29990"
state_file = "$tmp/state"
greylistd_listen = "$tmp/g.sock"
CONF
cat >"$tmp/real.conf" <<CONF
[socket]
path = $tmp/real.sock
owner = $(id -un):$(id -gn)
[data]
update = 3600
statefile = $tmp/states
tripletfile = $tmp/triplets
savetriplets = false
CONF
"${server[@]}" "$tmp/greyload" nullgreylistd -socket "$tmp/null.sock" 2>/dev/null &
npid=$!
sleep 0.3
# load SOCKET PID: drives the server at SOCKET and appends its CPU µs per
# request.
load() { measure "$2" 4 greylistd -socket "$1" -clients "$clients" -duration "${secs}s"; }
: >"$tmp/g"; : >"$tmp/n"; : >"$tmp/r"
for run in 1 2 3; do
  rm -f "$tmp/state"*
  "${server[@]}" "$tmp/greydaemon" -c "$tmp/g.toml" >/dev/null 2>"$tmp/err" &
  pid=$!
  sleep 0.4
  load "$tmp/g.sock" $pid | tee -a "$tmp/g.log" | rate >>"$tmp/g"
  kill $pid; wait $pid 2>/dev/null || true
  load "$tmp/null.sock" $npid | tee -a "$tmp/n.log" | rate >>"$tmp/n"
  if [ -x /usr/sbin/greylistd ]; then
    rm -f "$tmp/states" "$tmp/triplets"
    "${server[@]}" python3 /usr/sbin/greylistd "$tmp/real.conf" </dev/null >/dev/null 2>&1 &
    rpid=$!
    for _ in $(seq 50); do [ -S "$tmp/real.sock" ] && break; sleep 0.1; done
    load "$tmp/real.sock" $rpid | tee -a "$tmp/r.log" | rate >>"$tmp/r"
    kill $rpid; wait $rpid 2>/dev/null || true
  fi
done
g=$(median <"$tmp/g"); n=$(median <"$tmp/n")
echo "--- greylistd requests/s, medians of 3 ($clients clients, a connection per request, half new data strings)"
echo "greydaemon          $g   (at $((100 * g / n))% of the null responder)"
echo "null responder      $n"
if [ -s "$tmp/r" ]; then
  r=$(median <"$tmp/r")
  echo "greylistd 0.9       $r   (greydaemon at $(awk -v g="$g" -v r="$r" 'BEGIN {printf "%.1f", g / r}')x)"
fi
echo "--- greydaemon latency and CPU per request, the median run:"; sort -k2 -n "$tmp/g.log" | sed -n 2p
echo "--- the null responder's median run:"; sort -k2 -n "$tmp/n.log" | sed -n 2p
[ -s "$tmp/r" ] && { echo "--- greylistd's median run:"; sort -k2 -n "$tmp/r.log" | sed -n 2p; }
true
