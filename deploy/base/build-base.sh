#!/usr/bin/env bash
# Builds the runtime base image without any container registry: debootstraps a minimal
# Debian of the host's own release (so binaries built on the host find the same glibc)
# from the Debian mirror the host's apt already uses, and `docker import`s it.
#
#   deploy/base/build-base.sh            # -> ccq-base:<codename>, skipped if it exists
#   CCQ_BASE_IMAGE=name:tag MIRROR=http://... SUITE=bookworm deploy/base/build-base.sh
#   deploy/base/build-base.sh --force    # rebuild even if the tag exists
#
# Needs root, debootstrap (apt-get install debootstrap) and a Docker engine.
set -euo pipefail

log() { printf '[build-base] %s\n' "$*" >&2; }
die() { printf '[build-base] ERROR: %s\n' "$*" >&2; exit 1; }

force=0
[[ "${1:-}" == "--force" ]] && force=1

# The host's release: binaries built here link against its glibc.
# shellcheck disable=SC1091
. /etc/os-release
[[ "${ID:-}" == "debian" ]] || die "the host is ${ID:-unknown}, not Debian; set SUITE and MIRROR by hand"
SUITE="${SUITE:-${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}}"
IMAGE="${CCQ_BASE_IMAGE:-ccq-base:${SUITE}}"

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running?)"

if [[ $force == 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists; skipping (use --force to rebuild)"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get update && apt-get install -y debootstrap"

# The first Debian 'main' mirror apt is configured with for this suite, in either the
# one-line (sources.list) or the deb822 (*.sources) format.
find_mirror() {
    python3 - "$SUITE" <<'PY'
import glob, sys
suite = sys.argv[1]
found = []
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if not parts or parts[0] != "deb":
            continue
        parts = [p for p in parts[1:] if not p.startswith("[")]
        if len(parts) >= 3 and parts[1] == suite and "main" in parts[2:]:
            found.append(parts[0])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []) \
                and "main" in fields.get("components", []):
            found.extend(fields.get("uris", []))
print(found[0] if found else "")
PY
}
MIRROR="${MIRROR:-$(find_mirror)}"
[[ -n "$MIRROR" ]] || die "no Debian mirror for '$SUITE' in /etc/apt/sources.list*; set MIRROR"

work="$(mktemp -d /var/tmp/ccq-base.XXXXXX)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
root="$work/rootfs"

log "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)"
t0=$SECONDS
# A package cache outside the rootfs makes a rebuild on the same machine much faster.
cache="${CCQ_DEBOOTSTRAP_CACHE:-/var/cache/ccq-debootstrap}"
mkdir -p "$cache"
nice -n 19 debootstrap --variant=minbase --cache-dir="$cache" "$SUITE" "$root" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
}
log "debootstrap took $((SECONDS - t0)) s"

# Trim what a runtime image never needs: package caches and lists, docs, man pages, locales.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
# Let apt inside the image use the same mirror if anyone ever extends it.
echo "deb $MIRROR $SUITE main" >"$root/etc/apt/sources.list"

log "importing as $IMAGE"
tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$IMAGE" >/dev/null
docker image inspect --format '{{.Size}}' "$IMAGE" | awk -v i="$IMAGE" '{printf "[build-base] %s: %.0f MB\n", i, $1/1e6}' >&2
docker run --rm "$IMAGE" sh -c '. /etc/os-release; echo "[build-base] check: $PRETTY_NAME, $(ldd --version | head -1)"' >&2
