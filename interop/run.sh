#!/usr/bin/env bash
# Interoperability with the original Python services, over mutual TLS, both directions:
#   1. the original's Python client  -> our recommendations (Rust)
#   2. our marketplace (Rust)        -> the original's Python recommendations server
# and grpcurl (reflection, health) against our recommendations, with the README's commands.
# Stubs are generated from protobufs/recommendations.proto with grpcio-tools, so the test also
# proves the contract is unchanged. Needs Python 3 and PyPI; run from anywhere.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

venv=target/interop-venv
if [ ! -x "$venv/bin/grpcurl" ] || ! "$venv/bin/python" -c "import grpc, grpc_tools" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r interop/python/requirements.txt
fi
py="$root/$venv/bin/python"
"$py" -m grpc_tools.protoc -I protobufs --python_out="$work" --grpc_python_out="$work" \
    protobufs/recommendations.proto
cp interop/python/*.py "$work/"

cargo build -q --bin recommendations --bin marketplace --bin bookstore-certs
bin=target/debug
"$bin/bookstore-certs" --out "$work/pki"

# Waits for a line matching $2 in file $1 and prints it.
wait_for() {
    for _ in $(seq 200); do
        if grep -m1 -E "$2" "$1"; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for /$2/ in $1:"; cat "$1"; return 1
}

echo "--- 1. Python client -> Rust recommendations"
LISTEN_ADDR=127.0.0.1:0 ADMIN_ADDR=127.0.0.1:0 CERTS_DIR="$work/pki" "$bin/recommendations" 2>"$work/rec.log" &
pids+=($!)
addr=$(wait_for "$work/rec.log" "recommendations listening" | sed -E 's/.*addr=([^ ]+).*/\1/')
(cd "$work" && "$py" client.py "$addr" "$work/pki")

echo "--- grpcurl -> Rust recommendations (reflection, health), as in the README"
port=${addr##*:}
grpcurl=("$root/$venv/bin/grpcurl" -cacert "$work/pki/ca.pem" -cert "$work/pki/client.pem" -key "$work/pki/client.key")
"${grpcurl[@]}" localhost:"$port" list | tee "$work/list"
grep -qx "Recommendations" "$work/list"
"${grpcurl[@]}" -d '{"user_id": 1, "category": "MYSTERY", "max_results": 3}' \
    localhost:"$port" Recommendations/Recommend | tee "$work/reply"
[ "$(grep -c '"title"' "$work/reply")" = 3 ] || { echo "grpcurl: expected 3 books"; exit 1; }
"${grpcurl[@]}" localhost:"$port" grpc.health.v1.Health/Check | grep -q '"SERVING"'
echo "grpcurl: reflection, Recommend and health OK"

echo "--- 2. Rust marketplace -> Python recommendations server"
py_port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work" && exec "$py" server.py "$py_port" "$work/pki") >"$work/py.log" 2>&1 &
pids+=($!)
wait_for "$work/py.log" "python server listening" >/dev/null
LISTEN_ADDR=127.0.0.1:0 ADMIN_ADDR=127.0.0.1:0 RECOMMENDATIONS_HOST=127.0.0.1 RECOMMENDATIONS_PORT="$py_port" \
    RECOMMENDATIONS_TLS_NAME=localhost CERTS_DIR="$work/pki" "$bin/marketplace" 2>"$work/mkt.log" &
pids+=($!)
web=$(wait_for "$work/mkt.log" "marketplace listening" | sed -E 's/.*addr=([^ ]+).*/\1/')
page=$(curl -fsS "http://$web/")
items=$(grep -c "<li>" <<<"$page")
[ "$items" = 3 ] || { echo "expected 3 books from the Python server, got $items"; echo "$page"; exit 1; }
echo "marketplace page from the Python server: $items books"
echo "interop OK"
