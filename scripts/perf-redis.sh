#!/usr/bin/env bash
# The Redis mode's figures, in one run: greydaemon deciding in a private
# redis-server beside greydaemon deciding in memory, each driven three
# times, alternating, by `greyload run` (4 sockets, IN_FLIGHT requests in
# flight each, half new triplets), for each IN_FLIGHT given (default: 4
# and 16, that is 16 and 64 requests in flight). Prints medians, each
# process's CPU time per request, the latency at half the Redis rate, and
# Redis's memory per key. The generator, the daemon and Redis share the
# machine's cores, as the issue asks. Everything runs on 127.0.0.1 and
# stops by itself.
#
#   bash scripts/perf-redis.sh [seconds-per-run] [in-flight...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
shift || true
levels=("$@")
[ ${#levels[@]} -gt 0 ] || levels=(4 16)
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)"; exit 1; }
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
go build -o "$tmp/greydaemon" .
go build -o "$tmp/greyload" ./cmd/greyload
redis-server --port 29995 --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null &
rpid=$!
sleep 0.5
cat >"$tmp/redis.toml" <<CONF
redis_url = "redis://127.0.0.1:29995/0"
CONF
source scripts/perf-lib.sh
# run CONFIG [greyload flags]: a fresh daemon, one load run; prints the
# generator's line with the daemon's and Redis's CPU µs per request.
run() {
  local conf=$1; shift
  rm -f "$tmp/state"*
  "$tmp/greydaemon" -c "$conf" -m 0.02 127.0.0.1:29990 "$tmp/state" >/dev/null 2>"$tmp/err" &
  local pid=$!
  sleep 0.5
  local d0 r0 out d1 r1
  d0=$(cpu $pid); r0=$(cpu $rpid)
  out=$("$tmp/greyload" run -addr 127.0.0.1:29990 -duration "${secs}s" -warmup 2s -inflight "$inflight" "$@")
  d1=$(cpu $pid); r1=$(cpu $rpid)
  kill $pid; wait $pid 2>/dev/null || true
  echo "$out" | awk -v d=$((d1 - d0)) -v r=$((r1 - r0)) -v hz="$hz" \
    '{printf "%s  daemon cpu/req %.2fus  redis cpu/req %.2fus\n", $0, d * 1e6 / hz / $6, r * 1e6 / hz / $6}'
}
: >"$tmp/empty.toml"
for inflight in "${levels[@]}"; do
  : >"$tmp/m"; : >"$tmp/r"; : >"$tmp/m.log"; : >"$tmp/r.log"
  for i in 1 2 3; do
    run "$tmp/empty.toml" | tee -a "$tmp/m.log" | rate >>"$tmp/m"
    run "$tmp/redis.toml" | tee -a "$tmp/r.log" | rate >>"$tmp/r"
  done
  m=$(median <"$tmp/m"); r=$(median <"$tmp/r")
  echo "--- decisions/s, medians of 3 (4 sockets x $inflight in flight; mix 50% new, 30% retries, 20% known IPs)"
  echo "in memory   $m"
  echo "in Redis    $r   ($(awk -v r="$r" -v m="$m" 'BEGIN {printf "%.2f", r / m}')x)"
  echo "--- the median runs:"
  sort -k2 -n "$tmp/m.log" | sed -n 2p
  sort -k2 -n "$tmp/r.log" | sed -n 2p
  half=$((r / 2))
  echo "--- Redis mode at half its rate ($half/s):"
  run "$tmp/redis.toml" -rate "$half"
done
keys=$(redis-cli -p 29995 dbsize)
used=$(redis-cli -p 29995 info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
echo "--- Redis memory: $used bytes for $keys keys, $((used / keys)) bytes per key"
redis-cli -p 29995 info commandstats | grep -E 'evalsha|eval' || true
