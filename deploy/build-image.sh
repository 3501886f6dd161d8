#!/usr/bin/env bash
# Builds the ccq image (both binaries) without any container registry:
#   1. the base image ccq-base:<host codename> by debootstrap (deploy/base/build-base.sh;
#      skipped when the tag exists),
#   2. `cargo build --release` of coordinator and worker on the host,
#   3. deploy/Dockerfile with the prebuilt binaries on that base.
#
#   deploy/build-image.sh                      # -> ccq:latest
#   CCQ_IMAGE=ccq:0.1.0 deploy/build-image.sh
#
# With registry access, `docker build -f deploy/Dockerfile -t ccq:latest .` compiles
# inside the Rust image instead and needs none of this.
set -euo pipefail

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
IMAGE="${CCQ_IMAGE:-ccq:latest}"
# shellcheck disable=SC1091
. /etc/os-release
BASE="${CCQ_BASE_IMAGE:-ccq-base:${VERSION_CODENAME:?}}"

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running?)"

t0=$SECONDS
CCQ_BASE_IMAGE="$BASE" deploy/base/build-base.sh

log "cargo build --release --bin coordinator --bin worker"
nice -n 19 cargo build --release --bin coordinator --bin worker
target="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
rm -rf deploy/dist
mkdir -p deploy/dist
for bin in coordinator worker; do
    # The release profile keeps line tables for profiling; the image does not need them.
    if command -v strip >/dev/null; then
        strip -o "deploy/dist/$bin" "$target/release/$bin"
    else
        cp "$target/release/$bin" "deploy/dist/$bin"
    fi
done

log "docker build -f deploy/Dockerfile -t $IMAGE (base $BASE, prebuilt binaries)"
nice -n 19 docker build -f deploy/Dockerfile -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg BUILD_IMAGE="$BASE" \
    --build-arg CCQ_BINARIES=prebuilt \
    . >&2
# The classic builder leaves the intermediate `binaries` stage behind as a dangling image.
docker image prune --force --filter label=org.ccq.stage=binaries >/dev/null
docker image inspect --format '{{.Size}}' "$IMAGE" |
    awk -v i="$IMAGE" '{printf "[build-image] %s: %.0f MB\n", i, $1/1e6}' >&2
log "done in $((SECONDS - t0)) s"
