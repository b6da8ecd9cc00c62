# Shared by the perf scripts (sourced, not run).
#
# pin: by default (PIN=1, with taskset and two or more cores) the servers
# run on core 0 and the load generator on core 1: a generator that shares
# the servers' cores saturates first and holds every server to its own
# speed. Sets the arrays server and load to prefix the commands with.
pin() {
  server=() load=()
  if [ "${PIN:-1}" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    server=(taskset -c 0) load=(taskset -c 1)
    echo "servers pinned to core 0, the load generator to core 1"
  else
    echo "no pinning: the scheduler places every process"
  fi
}
# cpu PID: the process's user+system CPU time so far, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
# per_request TICKS FIELD: appends to each input line the CPU µs per request,
# TICKS clock ticks over the number of requests in the line's field FIELD.
per_request() { awk -v t="$1" -v f="$2" -v hz="$hz" '{printf "%s  cpu/req %.2fus\n", $0, t * 1e6 / hz / $f}'; }
# measure PID FIELD ARGS...: runs `greyload ARGS...` (from $tmp) as the load
# and prints its output with the CPU µs per request that the server PID
# spent, the requests counted in the output's field FIELD.
measure() {
  local pid=$1 field=$2 c0 out c1
  shift 2
  c0=$(cpu "$pid")
  out=$("${load[@]}" "$tmp/greyload" "$@")
  c1=$(cpu "$pid")
  echo "$out" | per_request $((c1 - c0)) "$field"
}
# rate: the requests/s field of the load tool's line.
rate() { awk '{print $2}'; }
# median: the median of numbers, one to a line.
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
