#!/usr/bin/env bash
# The README's quick start as a user runs it: `cargo xtask up`, open the page, press Ctrl+C.
# Ctrl+C is simulated the way a terminal delivers it: SIGINT to the whole process group.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${SMOKE_PORT:-5055}
grpc_port=${SMOKE_GRPC_PORT:-50555}
log=$(mktemp)
# Build what `cargo xtask up` builds first, so the wait below times the start-up and not a
# compile (earlier CI steps leave builds with other features behind).
cargo build --locked --quiet -p xtask
cargo build --locked --quiet --bin recommendations --bin marketplace
setsid cargo xtask up --port "$port" --grpc-port "$grpc_port" >"$log" 2>&1 &
pid=$!
cleanup() { kill -KILL -- "-$pid" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

for _ in $(seq 600); do
    grep -q "Bookstore is up" "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "xtask up exited early"; exit 1; }
    sleep 0.5
done
grep -q "Bookstore is up" "$log" || { cat "$log"; echo "the stack never came up"; exit 1; }

page=$(curl -fsS "http://localhost:$port/")
grep -q "<title>Online Books For You</title>" <<<"$page"
items=$(grep -c "<li>" <<<"$page")
[ "$items" = 3 ] || { echo "expected 3 books, got $items"; echo "$page"; exit 1; }
echo "page OK: 3 mystery books over mutual TLS"

kill -INT -- "-$pid"
status=0
wait "$pid" || status=$?
cat "$log"
[ "$status" = 0 ] || { echo "xtask up exited with $status after Ctrl+C"; exit 1; }
for svc in recommendations marketplace; do
    grep -E "^ *$svc \| .*Shut down gracefully" "$log" >/dev/null \
        || { echo "$svc did not log a graceful shutdown"; exit 1; }
done
echo "quick start OK"
