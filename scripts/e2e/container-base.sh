#!/usr/bin/env bash
# The base image for the container e2e (arm64) and the central image (amd64, make
# k8s-e2e), built here because no registry is reachable: a `debootstrap
# --variant=minbase` of bookworm for CBASE_ARCH (default arm64), trimmed the way the
# official debian:bookworm-slim is (no docs, man pages or apt caches), imported into
# local container storage as debian:bookworm-slim so `FROM debian:bookworm-slim` in
# Dockerfile.arm64 and deploy/Dockerfile.central resolve without a pull. One storage
# root per architecture: both images carry the same name.
#
#   . scripts/e2e/container-base.sh
#   cbase_host_tools; e2e_binfmt; cbase_image_ensure
#
# The root file system is cached as a tarball under E2E_CACHE (outside the checkout),
# separately from the Pi e2e's systemd rootfs: that one boots systemd, this one must
# stay small. Needs root (debootstrap, chroot, binfmt_misc).
set -euo pipefail

E2E_CACHE=${E2E_CACHE:-/var/cache/edge-agent-e2e}
CBASE_SUITE=${CBASE_SUITE:-bookworm}
CBASE_ARCH=${CBASE_ARCH:-arm64}
# -v2: translations dropped and PATH set (older caches are rebuilt once).
CBASE_TAR=${CBASE_TAR:-$E2E_CACHE/$CBASE_SUITE-$CBASE_ARCH-minbase-v2.tar}
CBASE_IMAGE=${CBASE_IMAGE:-docker.io/library/debian:bookworm-slim}
# One storage root for buildah and podman, cached beside the tarball. vfs needs no
# fuse-overlayfs or kernel overlay support inside this sandbox.
if [[ $CBASE_ARCH == arm64 ]]; then
    CSTORE_ROOT=${CSTORE_ROOT:-$E2E_CACHE/containers}
    CSTORE_RUNROOT=${CSTORE_RUNROOT:-/run/edge-agent-e2e/containers}
else
    CSTORE_ROOT=${CSTORE_ROOT:-$E2E_CACHE/containers-$CBASE_ARCH}
    CSTORE_RUNROOT=${CSTORE_RUNROOT:-/run/edge-agent-e2e/containers-$CBASE_ARCH}
fi
CBASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CSTORE_OPTS=(--root "$CSTORE_ROOT" --runroot "$CSTORE_RUNROOT" --storage-driver vfs)

clog() { printf '[container-e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# binfmt_misc registration and the host's Debian mirror are shared with the Pi e2e.
# shellcheck source=scripts/e2e/arm64-rootfs.sh
. "$(dirname "${BASH_SOURCE[0]}")/arm64-rootfs.sh"
# shellcheck source=scripts/e2e/need.sh
. "$(dirname "${BASH_SOURCE[0]}")/need.sh"

# Host tools from Debian (CI machines start bare). crun fails in this sandbox; runc works.
# (tar, flock, chroot, find: part of every Debian.) qemu only for a foreign CBASE_ARCH.
cbase_host_tools() {
    if [[ $CBASE_ARCH == "$(dpkg --print-architecture)" ]]; then
        need buildah buildah podman podman runc runc debootstrap debootstrap
    else
        need buildah buildah podman podman runc runc qemu-aarch64-static qemu-user-static \
            update-binfmts binfmt-support debootstrap debootstrap
    fi
}

# What makes the official slim image slim: dpkg drops docs, man pages and translations,
# apt keeps no package cache. Without these the size we report would be misleading.
cbase_slim_config() {
    local root=$1
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d" "$root/etc/apt/apt.conf.d"
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/docker-no-recommends"
}

cbase_rootfs_tar() {
    local work=$CBASE_TAR.d.partial mirror
    mirror=$(e2e_mirror)
    rm -rf "$work"
    mkdir -p "$work"
    cbase_slim_config "$work"
    if [[ $CBASE_ARCH == "$(dpkg --print-architecture)" ]]; then
        clog "debootstrap --variant=minbase $CBASE_SUITE $CBASE_ARCH from $mirror"
        debootstrap --arch="$CBASE_ARCH" --variant=minbase "$CBASE_SUITE" "$work" "$mirror"
    else
        clog "debootstrap --variant=minbase $CBASE_SUITE $CBASE_ARCH from $mirror (first stage)"
        debootstrap --arch="$CBASE_ARCH" --foreign --variant=minbase "$CBASE_SUITE" "$work" "$mirror"
        clog "debootstrap second stage under qemu (every maintainer script is emulated)"
        chroot "$work" /debootstrap/debootstrap --second-stage
    fi
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$CBASE_SUITE" "$mirror" "$CBASE_SUITE" \
        >"$work/etc/apt/sources.list"
    rm -rf "$work"/var/lib/apt/lists/* "$work"/var/cache/apt/archives/*.deb "$work"/var/log/*.log
    # The slim excludes only apply to packages unpacked after they were written; the
    # second stage wrote them before, but drop what slipped in anyway.
    find "$work/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    rm -rf "$work"/usr/share/man/* "$work"/usr/share/info/* "$work"/usr/share/lintian/*
    # Translations: 29 MB of the 110 that a plain debootstrap leaves (the first stage
    # unpacks without dpkg, so path-exclude cannot drop them).
    find "$work/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    : >"$work/etc/resolv.conf"
    tar --numeric-owner --xattrs -C "$work" -cf "$CBASE_TAR.partial" .
    mv "$CBASE_TAR.partial" "$CBASE_TAR"
    rm -rf "$work"
}

cbase_image_ensure() {
    mkdir -p "$E2E_CACHE"
    exec {CBASE_LOCK_FD}>"$E2E_CACHE/.container-base.lock"
    flock "$CBASE_LOCK_FD"
    if [[ -f $CBASE_TAR ]]; then
        clog "$CBASE_ARCH minbase rootfs cached: $CBASE_TAR"
    else
        cbase_rootfs_tar
    fi
    # The official image sets PATH; without it `podman kube play` (which adds no default)
    # finds no program of an image whose ENV extends $PATH. The label names the tarball,
    # so an import of an older one is made again.
    local label
    label=$(podman "${CSTORE_OPTS[@]}" image inspect --format '{{index .Config.Labels "edge-e2e.base"}}' \
        "$CBASE_IMAGE" 2>/dev/null || true)
    if [[ $label == "${CBASE_TAR##*/}" ]]; then
        clog "base image $CBASE_IMAGE already in $CSTORE_ROOT"
    else
        clog "importing $CBASE_TAR as $CBASE_IMAGE (linux/$CBASE_ARCH)"
        podman "${CSTORE_OPTS[@]}" import --os linux --arch "$CBASE_ARCH" \
            --change "ENV PATH=$CBASE_PATH" --change "LABEL edge-e2e.base=${CBASE_TAR##*/}" \
            --change 'CMD ["bash"]' "$CBASE_TAR" "$CBASE_IMAGE" >/dev/null
    fi
    flock -u "$CBASE_LOCK_FD"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    cbase_host_tools
    [[ $CBASE_ARCH == "$(dpkg --print-architecture)" ]] || e2e_binfmt
    cbase_image_ensure
fi
