#!/usr/bin/env bash
# vendor/candle-core is the crates.io release of candle-core named below with
# vendor/candle-core.patch applied (see vendor/README.md).
#
#   scripts/vendor_candle.sh --check   # offline: un-apply the patch in a copy and compare the
#                                      # tree's hash with the release's (CI runs this)
#   scripts/vendor_candle.sh           # re-create vendor/candle-core: download the release,
#                                      # verify its checksum, apply the patch
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.11.1
# The .crate file's sha256, as Cargo.lock recorded it before the patch.
CRATE_SHA256=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325
# sha256 of `sha256sum` over the release's files (sorted paths): see tree_hash.
TREE_SHA256=add788a504080fa526bc03f1667821e25799cfbe1e9ec144691841eafa2423e0

tree_hash() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ ${1:-} == --check ]]; then
    cp -r vendor/candle-core "$tmp/upstream"
    patch --quiet --reverse -p1 -d "$tmp/upstream" < vendor/candle-core.patch
    got=$(tree_hash "$tmp/upstream")
    if [[ $got != "$TREE_SHA256" ]]; then
        echo "vendor/candle-core without vendor/candle-core.patch is not candle-core $VERSION" \
            "(tree hash $got, expected $TREE_SHA256): re-create it with scripts/vendor_candle.sh" >&2
        exit 1
    fi
    echo "vendor/candle-core = candle-core $VERSION + vendor/candle-core.patch"
    exit 0
fi

curl -sSfL "https://static.crates.io/crates/candle-core/candle-core-$VERSION.crate" -o "$tmp/crate.tar.gz"
echo "$CRATE_SHA256  $tmp/crate.tar.gz" | sha256sum --check --quiet
tar -xzf "$tmp/crate.tar.gz" -C "$tmp"
src="$tmp/candle-core-$VERSION"
[[ $(tree_hash "$src") == "$TREE_SHA256" ]] || { echo "unexpected file tree in the release" >&2; exit 1; }
patch --quiet -p1 -d "$src" < vendor/candle-core.patch
rm -rf vendor/candle-core
mv "$src" vendor/candle-core
echo "wrote vendor/candle-core (candle-core $VERSION + vendor/candle-core.patch)"
