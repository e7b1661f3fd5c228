#!/usr/bin/env bash
# Build the central side's three images for this machine's architecture (amd64 here;
# CBASE_ARCH=arm64 builds them under qemu from the same files): the edge-fleet tools
# (deploy/Dockerfile.central), mosquitto and PostgreSQL from Debian's packages
# (deploy/images/). The base image is the debootstrap bookworm-slim of
# scripts/e2e/container-base.sh, cached under E2E_CACHE; an image whose inputs did not
# change is not built again (central_inputs_hash).
#
#   . scripts/e2e/central-images.sh
#   central_images_build        # sets CENTRAL_IMAGE, MOSQUITTO_IMAGE, POSTGRES_IMAGE,
#                               # CENTRAL_BUILD_S, CENTRAL_SIZE (bytes)
#
# The image names are those of deploy/kubernetes/ and deploy/compose.yaml. Needs root.
set -euo pipefail
CBASE_ARCH=${CBASE_ARCH:-$(dpkg --print-architecture)}
# shellcheck source=scripts/e2e/container-base.sh
. "$(dirname "${BASH_SOURCE[0]}")/container-base.sh"

CENTRAL_VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
CENTRAL_IMAGE=localhost/edge-fleet:$CENTRAL_VERSION
MOSQUITTO_IMAGE=localhost/edge-mosquitto:2.0
POSTGRES_IMAGE=localhost/edge-postgres:15

# pip inside RUN steps reaches PyPI the way this host does (same CA bundle, same index),
# through a /root mounted for the build only; none of it ends up in the image
# (scripts/container-e2e.sh explains the same mount).
central_pip_root() {
    local root=$1 index
    mkdir -p "$root/.config/pip"
    cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/e2e-ca.crt"
    index=$(pip3 config list 2>/dev/null | awk -F"'" '/^:env:\.index-url=/ {e = $2} /^global\.index-url=/ {g = $2} END {print (e != "" ? e : g)}')
    {
        echo "[global]"
        echo "cert = /root/e2e-ca.crt"
        echo "timeout = ${PIP_DEFAULT_TIMEOUT:-180}"
        if [[ -n $index ]]; then echo "index-url = $index"; fi
    } >"$root/.config/pip/pip.conf"
}

# The build inputs' hash: the Dockerfile, what it copies, the base image. An image that
# carries the same hash in its label is up to date and not built again. (No buildah
# layer cache: with the vfs driver every instruction of a cached build is a full copy
# of the root file system, which made a cold build twice as slow.)
central_inputs_hash() { # central_inputs_hash DOCKERFILE INPUT...
    local base
    base=$(podman "${CSTORE_OPTS[@]}" image inspect --format '{{.Id}}' "$CBASE_IMAGE")
    {
        echo "$base $CBASE_ARCH $CENTRAL_VERSION"
        # Comments (and the linters' pragmas in them) do not change the image.
        grep -v '^[[:space:]]*#' "$1" | sha256sum
        shift
        if (($#)); then
            find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | sort -z |
                xargs -0 sha256sum
        fi
    } | sha256sum | cut -c1-16
}

central_build_one() { # central_build_one DOCKERFILE TAG LOG INPUT...
    local file=$1 tag=$2 log=$3 revision hash have
    shift 3
    hash=$(central_inputs_hash "$file" "$@")
    have=$(podman "${CSTORE_OPTS[@]}" image inspect --format '{{index .Config.Labels "edge-e2e.inputs"}}' \
        "$tag" 2>/dev/null || true)
    if [[ $have == "$hash" ]]; then
        clog "$tag is up to date with its inputs ($hash)"
        return 0
    fi
    revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    clog "building $tag for linux/$CBASE_ARCH from $file"
    buildah "${CSTORE_OPTS[@]}" bud --isolation chroot --platform "linux/$CBASE_ARCH" \
        --pull=never --layers=false --format docker --file "$file" --tag "$tag" \
        --label "edge-e2e.inputs=$hash" \
        --build-arg "VERSION=$CENTRAL_VERSION" --build-arg "REVISION=$revision" \
        --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --volume "$CENTRAL_WORK/root:/root" . >"$log" 2>&1 || {
        tail -n 40 "$log" >&2
        clog "building $tag failed (whole log: $log)"
        return 1
    }
}

central_images_build() {
    cbase_host_tools
    [[ $CBASE_ARCH == "$(dpkg --print-architecture)" ]] || e2e_binfmt
    cbase_image_ensure
    need git git pip3 python3-pip
    CENTRAL_WORK=$(mktemp -d /tmp/central-images.XXXXXX)
    central_pip_root "$CENTRAL_WORK/root"
    local t0 pids=() pid failed=0
    t0=$(date +%s)
    # The three at once: most of a build is waiting for the mirror and PyPI.
    central_build_one deploy/Dockerfile.central "$CENTRAL_IMAGE" "$CENTRAL_WORK/central.log" \
        pyproject.toml README.md agent converter fleet &
    pids+=($!)
    central_build_one deploy/images/mosquitto.Dockerfile "$MOSQUITTO_IMAGE" "$CENTRAL_WORK/mosquitto.log" &
    pids+=($!)
    central_build_one deploy/images/postgres.Dockerfile "$POSTGRES_IMAGE" "$CENTRAL_WORK/postgres.log" \
        deploy/images/postgres-entrypoint.sh &
    pids+=($!)
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    ((failed == 0)) || return 1
    # The images they replace, untagged now, would stay behind at full size (vfs).
    podman "${CSTORE_OPTS[@]}" image prune -f >/dev/null 2>&1 || true
    CENTRAL_BUILD_S=$(($(date +%s) - t0))
    CENTRAL_SIZE=$(podman "${CSTORE_OPTS[@]}" image inspect --format '{{.Size}}' "$CENTRAL_IMAGE")
    clog "central images built in $(($(date +%s) - t0))s; $CENTRAL_IMAGE: $((CENTRAL_SIZE / 1000000)) MB"
    rm -rf "$CENTRAL_WORK"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    cd "$(dirname "$0")/../.."
    central_images_build
fi
