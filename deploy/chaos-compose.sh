#!/usr/bin/env bash
# The chaos check's frozen replica, on the compose stack:
#   1. `docker compose up --build -d --scale recommendations=2` (the marketplace resolves the
#      service name to both replicas);
#   2. the page driven open loop from this machine through the published port (target/release's
#      loadgen, built if missing), 250 ms intervals;
#   3. after BEFORE seconds, one replica is frozen (`docker kill -s STOP`), thawed (`-s CONT`)
#      FREEZE seconds later, and the load runs AFTER seconds more;
#   4. pages/s, failed pages and p99 before, during and after, as `cargo xtask chaos` prints
#      them; the stack is taken down (`docker compose down -v`).
#
# Needs a Docker-compatible engine with compose (on these machines:
# ../shared/tools/container-setup.sh --compose, then BASE_IMAGES_BY_TAG=1 for its stand-in base
# images). Run from a clone:
#   deploy/chaos-compose.sh                      # RATE=1000 BEFORE=5 FREEZE=10 AFTER=10
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
rate=${RATE:-1000}
before=${BEFORE:-5}
freeze=${FREEZE:-10}
after=${AFTER:-10}
port=${MARKETPLACE_PORT:-5078}
project=bookstore-chaos-$$
compose() { MARKETPLACE_PORT=$port docker compose -p "$project" "$@"; }
out=$repo/target/chaos-compose
mkdir -p "$out"
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

[ -x target/release/loadgen ] || cargo build --release --locked -p loadgen

# Where no registry is reachable, the base images are local stand-ins under their tags.
if [ -n "${BASE_IMAGES_BY_TAG:-}" ]; then
    base_tag() { sed -n "s/^ARG $1=\(.*\)@sha256:.*/\1/p" Dockerfile.recommendations; }
    RUST_IMAGE=$(base_tag RUST_IMAGE)
    RUNTIME_IMAGE=$(base_tag RUNTIME_IMAGE)
    export RUST_IMAGE RUNTIME_IMAGE
fi

# Podman without systemd runs no health check by itself (deploy/podman-healthchecks.sh).
if docker version 2>/dev/null | grep -qi podman && command -v podman >/dev/null; then
    bash deploy/podman-healthchecks.sh "$project" &
    health=$!
    trap 'kill $health 2>/dev/null; cleanup' EXIT
fi

echo "--> docker compose up --build -d --scale recommendations=2"
compose up --build -d --scale recommendations=2
for _ in $(seq 120); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 1
done
curl -fs -o /dev/null "http://127.0.0.1:$port/" || { compose logs; echo "no page"; exit 1; }
mapfile -t replicas < <(compose ps -q recommendations)
[ "${#replicas[@]}" -eq 2 ] || { echo "expected 2 replicas, got ${#replicas[@]}"; exit 1; }
# The marketplace re-resolves every 5 s: both replicas are known before the run.
sleep 6

total=$((before + freeze + after))
echo "--> $rate pages/s for $total s; replica ${replicas[1]:0:12} frozen from $before s to $((before + freeze)) s"
target/release/loadgen http --url "http://127.0.0.1:$port/" --rate "$rate" -d "$total" \
    --warmup 1 --json --timeline-ms 250 >"$out/report.json" &
load=$!
sleep $((1 + before))
docker kill -s STOP "${replicas[1]}" >/dev/null
sleep "$freeze"
docker kill -s CONT "${replicas[1]}" >/dev/null
wait "$load"

python3 - "$out/report.json" "$before" "$freeze" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
before, freeze = float(sys.argv[2]), float(sys.argv[3])
timeline = report["timeline"]
def phase(lo, hi):
    inside = [i for i in timeline if lo <= i["at_s"] < hi]
    ok = sum(i["ok"] for i in inside)
    failed = sum(i["failed"] for i in inside)
    p50s = sorted(i["p50_ms"] for i in inside)
    p99 = max((i["p99_ms"] for i in inside), default=0)
    return ok / max(len(inside) * 0.25, 1e-9), failed, p50s[len(p50s) // 2] if p50s else 0, p99
end = len(timeline) * 0.25
b, d, a = phase(0, before), phase(before, before + freeze), phase(before + freeze, end)
late = phase(before + 2, end)[1]
print("| Replica | Pages/s before | during | after | Failed pages | after the first 2 s | p50 / p99 ms before | during | after |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
print(f"| frozen (docker kill -s STOP), then thawed | {b[0]:.0f} | {d[0]:.0f} ({d[0] / max(b[0], 1e-9):.2f}×) "
      f"| {a[0]:.0f} | {d[1] + a[1]} | {late} | {b[2]:.1f} / {b[3]:.1f} | {d[2]:.1f} / {d[3]:.1f} | {a[2]:.1f} / {a[3]:.1f} |")
EOF
