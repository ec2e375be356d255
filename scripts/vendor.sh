#!/usr/bin/env bash
# vendor/<crate> is the crates.io release of that crate (versions below) with
# vendor/<crate>.patch applied (see vendor/README.md): candle-core and gemm-common.
#
#   scripts/vendor.sh --check   # offline: un-apply each patch in a copy and compare the tree's
#                               # hash with the release's (CI runs this)
#   scripts/vendor.sh           # re-create vendor/<crate>: download each release, verify its
#                               # checksum, apply the patch
set -euo pipefail
cd "$(dirname "$0")/.."

# name version crate-sha256 (as Cargo.lock recorded it before the patch) tree-sha256 (tree_hash
# of the release's files)
CRATES=(
    "candle-core 0.11.1 d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325 add788a504080fa526bc03f1667821e25799cfbe1e9ec144691841eafa2423e0"
    "gemm-common 0.19.0 88027625910cc9b1085aaaa1c4bc46bb3a36aad323452b33c25b5e4e7c8e2a3e 79b16d1e4cb10cda6ec6f4a9b0156a0dfdac5bbad9e6cc68acb5f6cc8e4b5cb5"
)

tree_hash() {
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for entry in "${CRATES[@]}"; do
    read -r name version crate_sha tree_sha <<< "$entry"
    if [[ ${1:-} == --check ]]; then
        rm -rf "$tmp/upstream"
        cp -r "vendor/$name" "$tmp/upstream"
        patch --quiet --reverse -p1 -d "$tmp/upstream" < "vendor/$name.patch"
        got=$(tree_hash "$tmp/upstream")
        if [[ $got != "$tree_sha" ]]; then
            echo "vendor/$name without vendor/$name.patch is not $name $version" \
                "(tree hash $got, expected $tree_sha): re-create it with scripts/vendor.sh" >&2
            exit 1
        fi
        echo "vendor/$name = $name $version + vendor/$name.patch"
        continue
    fi
    curl -sSfL "https://static.crates.io/crates/$name/$name-$version.crate" -o "$tmp/$name.tar.gz"
    echo "$crate_sha  $tmp/$name.tar.gz" | sha256sum --check --quiet
    tar -xzf "$tmp/$name.tar.gz" -C "$tmp"
    src="$tmp/$name-$version"
    [[ $(tree_hash "$src") == "$tree_sha" ]] || { echo "unexpected file tree in the $name release" >&2; exit 1; }
    patch --quiet -p1 -d "$src" < "vendor/$name.patch"
    rm -rf "vendor/$name"
    mv "$src" "vendor/$name"
    echo "wrote vendor/$name ($name $version + vendor/$name.patch)"
done
