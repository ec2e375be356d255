#!/usr/bin/env bash
# Re-create (or, with --check, verify) vendor/candle-core: the crates.io release of candle-core
# named below, checksum-verified, with vendor/candle-core.patch applied. See vendor/README.md.
#
#   scripts/vendor_candle.sh           # rewrite vendor/candle-core
#   scripts/vendor_candle.sh --check   # exit 1 unless vendor/candle-core is exactly that
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.11.1
SHA256=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325 # as in Cargo.lock before the patch

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sSfL "https://static.crates.io/crates/candle-core/candle-core-$VERSION.crate" -o "$tmp/crate.tar.gz"
echo "$SHA256  $tmp/crate.tar.gz" | sha256sum --check --quiet
tar -xzf "$tmp/crate.tar.gz" -C "$tmp"
src="$tmp/candle-core-$VERSION"
patch --quiet -p1 -d "$src" < vendor/candle-core.patch

if [[ ${1:-} == --check ]]; then
    diff -r "$src" vendor/candle-core
    echo "vendor/candle-core is candle-core $VERSION from crates.io with vendor/candle-core.patch"
else
    rm -rf vendor/candle-core
    mv "$src" vendor/candle-core
    echo "wrote vendor/candle-core (candle-core $VERSION + vendor/candle-core.patch)"
fi
