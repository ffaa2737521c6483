#!/usr/bin/env bash
# Measurements by hand, outside `cargo xtask bench`: the services on CPU 0, the load generator
# on CPU 1, as the benchmark's overload curve runs them (docs/performance.md).
#
#   bench/by-hand.sh curve [FRACTION...]   the open loop at these fractions of the closed-loop
#                                          peak (32 connections); default 0.9 1 1.25 1.5 2.
#                                          PEAK=<pages/s> skips measuring the peak, so two
#                                          builds can be offered the same rates
#   bench/by-hand.sh cpu [CONNECTIONS...]  CPU per page of each service in a closed loop of
#                                          this many connections; default 32 1000
#
# Settings come from the environment, which both services inherit, e.g.
#   MAX_REQUESTS_IN_FLIGHT=128 bench/by-hand.sh curve
# Needs `cargo build --profile profiling -p marketplace -p recommendations -p loadgen`, a dev
# PKI in certs/dev (`cargo xtask up` makes one), python3 and taskset. Ports 15000, 19090,
# 19091 and 50061 on 127.0.0.1 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/profiling}
certs=${CERTS:-certs/dev}
secs=${SECS:-5}
what=${1:?"curve or cpu"}
shift

pids=()
stop() { [ ${#pids[@]} -eq 0 ] || { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }; }
trap stop EXIT

LISTEN_ADDR=127.0.0.1:50061 ADMIN_ADDR=127.0.0.1:19091 CERTS_DIR=$certs LOG_FORMAT=json \
    taskset -c 0 "$bin/recommendations" 2>/dev/null &
pids+=($!)
recommendations=$!
sleep 0.5
# By address, not by name: the marketplace calls every address a name resolves to, and
# recommendations listens on 127.0.0.1 only. The dev certificate names localhost.
LISTEN_ADDR=127.0.0.1:15000 ADMIN_ADDR=127.0.0.1:19090 RECOMMENDATIONS_HOST=127.0.0.1 \
    RECOMMENDATIONS_PORT=50061 RECOMMENDATIONS_TLS_NAME=localhost CERTS_DIR=$certs LOG_FORMAT=json \
    taskset -c 0 "$bin/marketplace" 2>/dev/null &
pids+=($!)
marketplace=$!
ready=
for _ in $(seq 50); do
    curl -fs -o /dev/null http://127.0.0.1:15000/ && { ready=1; break; }
    sleep 0.1
done
[ -n "$ready" ] || { echo "the marketplace did not serve a page within 5 s" >&2; exit 1; }

load() { taskset -c 1 "$bin/loadgen" http --url http://127.0.0.1:15000/ --json "$@"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

case $what in
curve)
    if [ -n "${PEAK:-}" ]; then
        peak=$PEAK
        echo "peak (given): $peak pages/s"
    else
        peak=$(load -c 32 -d "$secs" | python3 -c 'import json,sys; print(json.load(sys.stdin)["throughput"])')
        python3 -c "print(f'peak (32 connections, closed loop): {$peak:.0f} pages/s')"
    fi
    for fraction in "${@:-0.9 1 1.25 1.5 2}"; do
        for f in $fraction; do
            rate=$(python3 -c "print(round($peak * $f))")
            load -c 500 --rate "$rate" -d "$secs" | python3 -c "
import json, sys
r = json.load(sys.stdin)
print(f'{$f}x, {$rate} offered: {r[\"throughput\"]:.0f} answered 200/s ({100 * r[\"throughput\"] / $peak:.0f} % of the peak), '
      f'p50 {r[\"latency_ms\"][\"p50\"]:.1f} ms, failed {r[\"errors\"]}')"
        done
    done
    ;;
cpu)
    for connections in "${@:-32 1000}"; do
        for c in $connections; do
            load -c "$c" -d 1 >/dev/null # connections open before the CPU is read
            m0=$(cpu_ticks "$marketplace")
            r0=$(cpu_ticks "$recommendations")
            # No warm-up inside the run: the CPU read around it must cover the pages it counts.
            report=$(load -c "$c" -d "$secs" --warmup 0)
            m1=$(cpu_ticks "$marketplace")
            r1=$(cpu_ticks "$recommendations")
            ticks=$(getconf CLK_TCK)
            python3 -c "
import json
r = json.loads('''$report''')
n = max(r['ok'], 1)
us = lambda a, b: (b - a) / $ticks * 1e6 / n
print(f'{$c} connections: {r[\"throughput\"]:.0f} pages/s, failed {r[\"errors\"]}; CPU a page: '
      f'marketplace {us($m0, $m1):.1f} us, recommendations {us($r0, $r1):.1f} us')"
        done
    done
    ;;
*)
    echo "unknown measurement: $what (curve or cpu)" >&2
    exit 2
    ;;
esac
