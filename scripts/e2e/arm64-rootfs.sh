#!/usr/bin/env bash
# Build (once) and cache an arm64 Debian bookworm root file system for the emulated
# Raspberry Pi checks. Source it for the helper functions, or run it to just build:
#
#   scripts/e2e/arm64-rootfs.sh            # prints the rootfs path when ready
#   . scripts/e2e/arm64-rootfs.sh; e2e_rootfs_ensure; echo "$E2E_ROOTFS"
#
# The cache lives outside the checkout (E2E_CACHE, default /var/cache/edge-agent-e2e)
# so `git clean` does not throw away ten minutes of emulated debootstrap.
# Needs root: debootstrap, chroot and binfmt_misc all do.
set -euo pipefail

E2E_CACHE=${E2E_CACHE:-/var/cache/edge-agent-e2e}
E2E_SUITE=${E2E_SUITE:-bookworm}
E2E_ROOTFS=${E2E_ROOTFS:-$E2E_CACHE/$E2E_SUITE-arm64}
# What the device side needs: its own systemd (booted by nspawn), Python 3.11 with venv
# for the agent, CA certificates for pip. Raspberry Pi OS bookworm ships the same.
E2E_PACKAGES=${E2E_PACKAGES:-systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps,iproute2}

e2e_log() { printf '[e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# shellcheck source=scripts/e2e/need.sh
. "$(dirname "${BASH_SOURCE[0]}")/need.sh"

# Host tools, installed through apt when missing (CI machines start bare): these and
# what pi-e2e.sh calls on the host (pgrep; nsenter, flock, mount: util-linux, always
# there). mosquitto: the host's broker in pi-e2e.
e2e_host_packages() {
    need debootstrap debootstrap qemu-aarch64-static qemu-user-static \
        update-binfmts binfmt-support systemd-nspawn systemd-container \
        mosquitto mosquitto pgrep procps git git
}

# Run arm64 binaries through qemu-user-static. The F (fix-binary) flag of the Debian
# registration means the interpreter is opened once here, so the chroot needs no copy.
e2e_binfmt() {
    if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
    if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        update-binfmts --import qemu-aarch64 || true
        update-binfmts --enable qemu-aarch64
    fi
    grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
        e2e_log "binfmt_misc: qemu-aarch64 is not enabled"
        return 1
    }
}

# The Debian mirror this machine's apt already uses (deb822 or one-line format), so the
# e2e goes through the same route (and proxy or snapshot) as the host.
e2e_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources |
            grep -v -e security -e nodesource -e google | head -n1 || true)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

e2e_rootfs_build() {
    local tmp=$E2E_ROOTFS.partial mirror
    mirror=$(e2e_mirror)
    rm -rf "$tmp"
    mkdir -p "$E2E_CACHE"
    e2e_log "debootstrap $E2E_SUITE arm64 (first stage) from $mirror"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include="$E2E_PACKAGES" "$E2E_SUITE" "$tmp" "$mirror"
    # Older qemu-user-static registrations lack the F flag; a copy makes both work.
    cp /usr/bin/qemu-aarch64-static "$tmp/usr/bin/"
    e2e_log "debootstrap second stage under qemu (slow: every dpkg maintainer script is emulated)"
    chroot "$tmp" /debootstrap/debootstrap --second-stage
    printf 'deb %s %s main\n' "$mirror" "$E2E_SUITE" >"$tmp/etc/apt/sources.list"
    echo edge-pi >"$tmp/etc/hostname"
    # The container's own systemd would otherwise wait for a console login and a
    # network it cannot configure; the agent needs neither.
    chroot "$tmp" systemctl --quiet mask getty@tty1.service console-getty.service \
        systemd-networkd-wait-online.service systemd-timesyncd.service
    mv "$tmp" "$E2E_ROOTFS"
    touch "$E2E_ROOTFS/.edge-e2e-base"
}

# Host CA certificates (this sandbox intercepts TLS) and DNS into the rootfs, so pip
# inside reaches the same index as pip on the host.
# Cheap when nothing changed: update-ca-certificates under qemu takes ~10 s.
e2e_rootfs_network() {
    local root=${1:-$E2E_ROOTFS} crt changed=0
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        mkdir -p "$root/usr/local/share/ca-certificates"
        for crt in /usr/local/share/ca-certificates/*.crt; do
            if ! cmp -s "$crt" "$root/usr/local/share/ca-certificates/${crt##*/}"; then
                cp "$crt" "$root/usr/local/share/ca-certificates/"
                changed=1
            fi
        done
        if ((changed)); then
            chroot "$root" /usr/sbin/update-ca-certificates >/dev/null
        fi
    fi
    rm -f "$root/etc/resolv.conf"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
}

# Build the rootfs unless cached. Serialised with flock: the Pi and container e2e may
# share one cache.
e2e_rootfs_ensure() {
    e2e_host_packages
    e2e_binfmt
    mkdir -p "$E2E_CACHE"
    exec {E2E_LOCK_FD}>"$E2E_CACHE/.lock"
    flock "$E2E_LOCK_FD"
    if [[ -f $E2E_ROOTFS/.edge-e2e-base ]]; then
        e2e_log "arm64 rootfs cached at $E2E_ROOTFS"
    else
        e2e_rootfs_build
    fi
    e2e_rootfs_network "$E2E_ROOTFS"
    flock -u "$E2E_LOCK_FD"
}

# Run a command inside the rootfs (not booted) with a clean environment: the host's
# PIP_* and *_CA_BUNDLE variables point at paths that make no sense in there.
e2e_chroot() {
    local root=$1
    shift
    mount --bind /proc "$root/proc"
    mount --bind /dev "$root/dev"
    local rc=0
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 chroot "$root" "$@" || rc=$?
    umount "$root/dev" "$root/proc"
    return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    e2e_rootfs_ensure
    echo "$E2E_ROOTFS"
fi
