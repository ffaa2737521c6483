#!/usr/bin/env bash
# The README's `docker compose up`, checked for real on a fresh clone:
#   1. clone the repository's HEAD into a temporary folder (nothing from this work tree leaks in);
#   2. `docker compose up --build -d`: both images built, the PKI made by the one-shot service;
#   3. the page fetched from the published port: served by the marketplace container, which asks
#      recommendations over the compose network with mutual TLS (its log names the caller);
#   4. a real browser (headless Chromium) opens the page: title, three books, a working category
#      link, and a screenshot;
#   5. what each container can read: its own key and the CA certificate, and only the one-shot
#      certs step has the CA's key;
#   6. `docker compose stop`: both services log a graceful shutdown;
#   7. image sizes, and the size of our own layer (the base images here are local stand-ins).
#
# Needs a Docker-compatible engine with compose (on these machines:
# ../shared/tools/container-setup.sh --compose) and chromium. Usage:
#   deploy/compose-test.sh [SCREENSHOT.png]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
screenshot=${1:-$repo/target/compose-test/marketplace.png}
port=${MARKETPLACE_PORT:-5077}
mkdir -p "$(dirname "$screenshot")"

work=$(mktemp -d)
project=bookstore-ci-$$
compose() { docker compose -p "$project" "$@"; }
cleanup() {
    (cd "$work/clone" 2>/dev/null && compose down -v --remove-orphans >/dev/null 2>&1) || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n--> %s\n' "$*"; }

# Fails, printing the log, unless both services' logs have a line containing $1 ($2 says what
# that means). The whole log is read first: `grep -q` stops at the first match, and under
# pipefail the writer's SIGPIPE would fail the pipeline whenever more lines follow it.
each_log_has() {
    local svc log
    for svc in recommendations marketplace; do
        log=$(compose logs "$svc")
        grep -qF -- "$1" <<<"$log" || { echo "$log"; echo "$svc: $2"; exit 1; }
    done
}

step "fresh clone of HEAD"
git clone --quiet "$repo" "$work/clone"
cd "$work/clone"
git log --oneline -1

# Podman without systemd runs no health check by itself (deploy/podman-healthchecks.sh).
engine=$(docker version 2>/dev/null || true)
if grep -qi podman <<<"$engine" && command -v podman >/dev/null; then
    bash deploy/podman-healthchecks.sh "$project" &
    scheduler=$!
    trap 'kill $scheduler 2>/dev/null || true; cleanup' EXIT
fi

# Where no registry can be reached (these machines) the base images exist only as local
# stand-ins under their tags (../shared/tools/container-setup.sh), and a digest cannot be faked:
# build against the tags the Dockerfiles pin.
if [ -n "${BASE_IMAGES_BY_TAG:-}" ]; then
    base_tag() { sed -n "s/^ARG $1=\(.*\)@sha256:.*/\1/p" Dockerfile.recommendations; }
    RUST_IMAGE=$(base_tag RUST_IMAGE)
    RUNTIME_IMAGE=$(base_tag RUNTIME_IMAGE)
    export RUST_IMAGE RUNTIME_IMAGE
    echo "base images by tag: $RUST_IMAGE, $RUNTIME_IMAGE"
fi

step "docker compose build, then up -d (MARKETPLACE_PORT=$port)"
started=$(date +%s)
# One image at a time: podman's compatibility API can wedge when several builds share cache
# mounts at once (BuildKit, under Docker, copes with `docker compose up --build` as is).
COMPOSE_PARALLEL_LIMIT=1 compose build
echo "built after $(( $(date +%s) - started )) s"
# The images carry trace export: pointed at a collector (none listens here), each service says
# it exports, where a build without the feature would warn that it cannot.
MARKETPLACE_PORT=$port OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 compose up -d
echo "up after $(( $(date +%s) - started )) s"

step "waiting for the page"
url="http://127.0.0.1:$port/"
for _ in $(seq 120); do
    curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null && break
    sleep 1
done
page=$(curl -fsS -m 10 "$url") || { compose ps; compose logs; echo "the page never came up"; exit 1; }
grep -q "<title>Online Books For You</title>" <<<"$page"
items=$(grep -c "<li>" <<<"$page")
[ "$items" = 3 ] || { echo "expected 3 books, got $items"; echo "$page"; exit 1; }
echo "page OK: 3 mystery books"
compose ps

# The call crossed the compose network with mutual TLS: recommendations authorized the caller
# by its certificate identity.
compose logs recommendations | grep -E 'gRPC call.*peer_identity="?marketplace' >/dev/null \
    || { compose logs recommendations; echo "no mutual-TLS call from marketplace logged"; exit 1; }
echo "recommendations logged calls from the certificate identity 'marketplace'"

each_log_has "exporting traces over OTLP" "the image does not export traces"
echo "both images export traces when OTEL_EXPORTER_OTLP_ENDPOINT is set"

step "key material: the files in each container's mounts"
mounted() { # every file in the volumes mounted into service $1's container, sorted
    local id
    id=$(compose ps -a -q "$1")
    [ -n "$id" ] || { echo "no container for $1" >&2; return 1; }
    docker inspect --format '{{range .Mounts}}{{println .Source}}{{end}}' "$id" |
        while read -r dir; do [ -z "$dir" ] || ls -A "$dir"; done | sort | paste -sd' ' -
}
for want in "recommendations:ca.pem server.key server.pem" "marketplace:ca.pem client.key client.pem"; do
    svc=${want%%:*}
    got=$(mounted "$svc")
    [ "$got" = "${want#*:}" ] || { echo "$svc can read: $got (expected ${want#*:})"; exit 1; }
    echo "$svc can read: $got"
done
# The CA's key is made, and stays, in the certs step's own volume.
certs_files=$(mounted certs)
grep -qw ca.key <<<"$certs_files" || { echo "certs step: no ca.key in $certs_files"; exit 1; }
echo "certs (one-shot, exited) has the CA key: $certs_files"

step "a real browser"
browser() {
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$work/chromium" "$@" 2>/dev/null
}
dom=$(browser --dump-dom "$url")
grep -q "<title>Online Books For You</title>" <<<"$dom" || { echo "$dom"; echo "no title"; exit 1; }
[ "$(grep -o "<li>" <<<"$dom" | wc -l)" = 3 ] || { echo "$dom"; echo "not three books"; exit 1; }
link=$(grep -o 'href="[^"]*category=science_fiction[^"]*"' <<<"$dom" | head -1 | cut -d'"' -f2)
[ -n "$link" ] || { echo "$dom"; echo "no science fiction link"; exit 1; }
link=${link//&amp;/&}
dom=$(browser --dump-dom "http://127.0.0.1:$port$link")
grep -q "Science fiction books you may like" <<<"$dom" || { echo "$dom"; echo "category link broken"; exit 1; }
browser --window-size=900,420 --screenshot="$screenshot" "$url" >/dev/null
[ -s "$screenshot" ] || { echo "no screenshot"; exit 1; }
echo "browser OK: title, three books, category link; screenshot $screenshot"

step "docker compose stop"
compose stop
each_log_has "Shut down gracefully" "did not shut down gracefully"
echo "both services shut down gracefully"

step "image sizes"
for image in bookstore/recommendations:dev bookstore/marketplace:dev bookstore/certs:dev; do
    total=$(docker image inspect --format '{{.Size}}' "$image")
    # Our layers are the COPYs onto the base image: the binary (and for certs, its empty folder).
    ours=$(docker history --format '{{.Size}}|{{.CreatedBy}}' "$image" | grep COPY | cut -d'|' -f1 | paste -sd+ -)
    printf '%-32s %s MB in all, our layers %s\n' "$image" "$(awk "BEGIN { printf \"%.1f\", $total / 1e6 }")" "$ours"
done

echo
echo "compose test passed"
