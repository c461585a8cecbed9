#!/bin/sh
# Builds the stalewatch image from a binary that is already built:
#   packaging/container/build.sh BINARY TAG
# BINARY: preferably the static build
#   (cargo build --release --target x86_64-unknown-linux-musl), else
#   target/release/stalewatch, whose shared libraries and loader are then
#   copied in as well (found with ldd).
# The image is built with the classic builder (DOCKER_BUILDKIT=0), which
# needs no registry for FROM scratch.
set -eu
bin=${1:?usage: build.sh BINARY TAG}
tag=${2:?usage: build.sh BINARY TAG}
here=$(cd "$(dirname "$0")" && pwd)
ctx=$(mktemp -d "${TMPDIR:-/tmp}/stalewatch-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT

mkdir -p "$ctx/rootfs/usr/bin"
cp "$here/Dockerfile" "$ctx/Dockerfile"
cp "$bin" "$ctx/rootfs/usr/bin/stalewatch"
# A static binary makes ldd say "not a dynamic executable" (or
# "statically linked") and exit non-zero: nothing more to copy.
if libs=$(ldd "$bin" 2>/dev/null); then
    echo "$libs" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
        while read -r lib; do
            mkdir -p "$ctx/rootfs$(dirname "$lib")"
            cp -L "$lib" "$ctx/rootfs$lib"
        done
fi
DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx"
