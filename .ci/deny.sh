#!/usr/bin/env bash
# cargo deny check (deny.toml), offline: advisories from the RustSec snapshot in
# ../shared/advisory-db, licences, bans and sources from Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny@0.20.2
# cargo-deny keeps each database in a folder named after its URL's hash; a database it reads
# offline must be a git repository (it takes the snapshot's time from HEAD).
snapshot=../shared/advisory-db
db=${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691
if [ ! -d "$db/.git" ]; then
    mkdir -p "$(dirname "$db")"
    cp -R "$snapshot" "$db"
    chmod -R u+w "$db"
    git -C "$db" init -q
    git -C "$db" add -A
    git -C "$db" -c user.name=ci -c user.email=ci@localhost commit -qm "RustSec snapshot" >/dev/null
fi
echo "advisory database: the RustSec snapshot of $(grep -m1 -o '20[0-9][0-9]-[01][0-9]-[0-3][0-9]' "$snapshot/SNAPSHOT.md")"
# cargo metadata needs every platform's crates on disk before an offline run.
cargo fetch --locked >/dev/null
cargo deny --offline --locked check advisories bans licenses sources
