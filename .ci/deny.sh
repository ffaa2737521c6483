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
# The copy is made again whenever the snapshot differs from the one it was made from (a reused
# machine otherwise kept its first copy for ever): the fingerprint is a hash of every file.
fingerprint() { (cd "$1" && find . -path ./.git -prune -o -type f ! -name .snapshot-fingerprint -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }
wanted=$(fingerprint "$snapshot")
if [ ! -d "$db/.git" ] || [ "$(cat "$db/.snapshot-fingerprint" 2>/dev/null)" != "$wanted" ]; then
    rm -rf "$db"
    mkdir -p "$(dirname "$db")"
    cp -R "$snapshot" "$db"
    chmod -R u+w "$db"
    echo "$wanted" > "$db/.snapshot-fingerprint"
    # cargo-deny dates the database by its HEAD commit: the snapshot's own date, not today's.
    taken=$(grep -m1 -o '20[0-9][0-9]-[01][0-9]-[0-3][0-9]' "$db/SNAPSHOT.md" || date -u +%F)
    git -C "$db" init -q
    git -C "$db" add -A
    GIT_AUTHOR_DATE="${taken}T00:00:00Z" GIT_COMMITTER_DATE="${taken}T00:00:00Z" \
        git -C "$db" -c user.name=ci -c user.email=ci@localhost commit -qm "RustSec snapshot" >/dev/null
fi
# What is checked is the copy: say which one it is.
commit=$(grep -m1 -o '[0-9a-f]\{40\}' "$db/SNAPSHOT.md" || echo unknown)
echo "advisory database checked: $db, RustSec commit $commit of $(git -C "$db" log -1 --format=%cs), fingerprint $(cat "$db/.snapshot-fingerprint")"
# cargo metadata needs every platform's crates on disk before an offline run.
cargo fetch --locked >/dev/null
cargo deny --offline --locked check advisories bans licenses sources
