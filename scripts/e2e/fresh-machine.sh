#!/usr/bin/env bash
# The README's test command on a machine where nothing was installed by hand: a minimal
# Debian bookworm (amd64, debootstrap --variant=minbase) with only what the README
# asks for (git, make, python3), a fresh `git clone` of this repository in /src, and
# `make test` run inside it with chroot. Whatever the suite needs beyond that,
# scripts/setup.sh has to install; a missing tool shows up here and nowhere else.
#
#   scripts/e2e/fresh-machine.sh [TARGET...]     # default target: test
#
# What reaches the chroot from the host is the network route only, so that apt and pip
# inside go where they go on this host: the host's Debian apt sources (and its
# Acquire::*proxy / Check-* settings), DNS, the local CA certificates (this sandbox
# intercepts TLS), the pip configuration files, the PIP_* variables and the local
# folders they name (find-links, file:// indexes; bind-mounted read-only).
#
# The clean debootstrap is cached as a tarball (E2E_CACHE, default
# /var/cache/edge-agent-e2e, beside the arm64 rootfs); every run unpacks a new copy, so
# each run starts from the same fresh machine. Needs root (debootstrap, chroot, mount).
# Always unmounts what it mounted (trap), then deletes the machine.
#
# Env: FRESH_REPO (what to clone; default this checkout), FRESH_REF (a commit or
# branch to check out; default the clone's HEAD), FRESH_DIR (where the machine goes;
# default a new /var/tmp/edge-agent-fresh.XXXXXX), FRESH_KEEP=1 (keep the machine
# after the run, mounts removed), FRESH_REBUILD=1 (debootstrap again, not the cache).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/e2e/need.sh
. "$HERE/need.sh"
# e2e_mirror: the Debian mirror this host's apt uses (shared with the arm64 e2e).
# shellcheck source=scripts/e2e/arm64-rootfs.sh
. "$HERE/arm64-rootfs.sh"
NEED_LOG_PREFIX=fresh-machine

E2E_CACHE=${E2E_CACHE:-/var/cache/edge-agent-e2e}
FRESH_SUITE=${FRESH_SUITE:-bookworm}
# The README: "On a fresh Debian (bookworm) machine with git, make and python3".
FRESH_INCLUDE=${FRESH_INCLUDE:-git,make,python3}
FRESH_REPO=${FRESH_REPO:-$ROOT}
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(test)

flog() { printf '[fresh-machine %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

[[ $(id -u) == 0 ]] || {
    flog "needs root (debootstrap, chroot, mount)"
    exit 1
}
need debootstrap debootstrap git git chroot coreutils mount mount umount mount \
    tar tar flock util-linux dpkg dpkg apt-config apt
FRESH_ARCH=$(dpkg --print-architecture)
FRESH_TAR=$E2E_CACHE/$FRESH_SUITE-$FRESH_ARCH-fresh.tar

M=""
MOUNTS=()
T0=$SECONDS

mounted_below() { awk -v r="$1/" 'index($2 "/", r) == 1 {print $2}' /proc/mounts; }

cleanup() {
    local rc=$? m
    set +e
    if [[ -n $M ]]; then
        # What this script mounted, newest first; then anything left below the machine
        # (a test's tmpfs whose test was killed), deepest first.
        for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
            umount "${MOUNTS[i]}" || umount -l "${MOUNTS[i]}"
        done
        mounted_below "$M" | sort -r | while read -r m; do umount -l "$m"; done
        if [[ -n $(mounted_below "$M") ]]; then
            flog "mounts are left below $M: not deleting it"
            mounted_below "$M" >&2
            rc=1
        elif [[ ${FRESH_KEEP:-0} == 1 ]]; then
            flog "machine kept: $M (chroot $M /bin/bash)"
        else
            rm -rf --one-file-system "$M"
        fi
    fi
    flog "total $((SECONDS - T0))s; exit $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bind() { # bind SRC DST [ro]
    mkdir -p "$2"
    mount --bind "$1" "$2"
    MOUNTS+=("$2")
    if [[ ${3:-} == ro ]]; then
        mount -o remount,bind,ro "$2"
    fi
}

# ---- 1. the clean machine (cached tarball of a minbase debootstrap) ----------------------
mkdir -p "$E2E_CACHE"
exec {FRESH_LOCK_FD}>"$E2E_CACHE/.fresh-machine.lock"
flock "$FRESH_LOCK_FD"
if [[ ! -f $FRESH_TAR || ${FRESH_REBUILD:-0} == 1 ]]; then
    mirror=$(e2e_mirror)
    work=$E2E_CACHE/$FRESH_SUITE-$FRESH_ARCH-fresh.partial
    rm -rf --one-file-system "$work"
    flog "debootstrap --variant=minbase --include=$FRESH_INCLUDE $FRESH_SUITE $FRESH_ARCH from $mirror"
    t=$SECONDS
    debootstrap --arch="$FRESH_ARCH" --variant=minbase --include="$FRESH_INCLUDE" \
        "$FRESH_SUITE" "$work" "$mirror" >"$E2E_CACHE/fresh-debootstrap.log" 2>&1 || {
        tail -n 30 "$E2E_CACHE/fresh-debootstrap.log" >&2
        exit 1
    }
    rm -rf "$work"/var/lib/apt/lists/* "$work"/var/cache/apt/archives/*.deb
    tar --numeric-owner --xattrs -C "$work" -cf "$FRESH_TAR.partial" .
    mv "$FRESH_TAR.partial" "$FRESH_TAR"
    rm -rf --one-file-system "$work"
    flog "debootstrap took $((SECONDS - t))s; cached as $FRESH_TAR"
else
    flog "clean $FRESH_SUITE $FRESH_ARCH machine cached: $FRESH_TAR"
fi
flock -u "$FRESH_LOCK_FD"

if [[ -n ${FRESH_DIR:-} ]]; then
    [[ ! -e $FRESH_DIR ]] || {
        flog "FRESH_DIR=$FRESH_DIR exists: a fresh machine needs a new folder"
        exit 1
    }
    mkdir -p "$FRESH_DIR"
    M=$(cd "$FRESH_DIR" && pwd)
else
    M=$(mktemp -d /var/tmp/edge-agent-fresh.XXXXXX)
fi
chmod 0755 "$M"
tar --numeric-owner --xattrs -C "$M" -xf "$FRESH_TAR"
flog "machine in $M"

# ---- 2. the network route of this host: apt, DNS, CA certificates, pip -------------------
# apt: the host's Debian sources (not third-party ones a fresh machine would not have),
# and the Acquire settings that decide how the mirror is reached.
rm -f "$M/etc/apt/sources.list" "$M"/etc/apt/sources.list.d/*
debian_src() { grep -qE 'debian-archive-keyring|https?://[^ ]*/debian(-security|-ports)?/?([[:space:]]|$)' "$1"; }
n=0
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    if debian_src "$f"; then
        cp "$f" "$M$f"
        n=$((n + 1))
    else
        flog "apt: not copying $f (not a Debian archive)"
    fi
done
((n)) || printf 'deb %s %s main\n' "$(e2e_mirror)" "$FRESH_SUITE" >"$M/etc/apt/sources.list"
apt-config dump | grep -iE '^Acquire::((https?|ftp)::proxy|Check-Valid-Until|Check-Date)' \
    >"$M/etc/apt/apt.conf.d/99host-route" || rm -f "$M/etc/apt/apt.conf.d/99host-route"
rm -f "$M/etc/resolv.conf"
cp -L /etc/resolv.conf "$M/etc/resolv.conf"
cp /etc/hosts "$M/etc/hosts"
# CA certificates: the local ones (update-ca-certificates keeps them when the Debian
# package ca-certificates is installed later) and the bundle they made on this host.
if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
    mkdir -p "$M/usr/local/share/ca-certificates"
    cp -r /usr/local/share/ca-certificates/. "$M/usr/local/share/ca-certificates/"
fi
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    mkdir -p "$M/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$M/etc/ssl/certs/ca-certificates.crt"
fi
# pip: its configuration files where pip looks for them, the PIP_* variables, and what
# they name on this disk (a file is copied, a folder bind-mounted read-only).
PIP_ENV=()
while IFS= read -r var; do PIP_ENV+=("$var=${!var}"); done < <(compgen -e | grep '^PIP_' || true)
pip_files=(/etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf")
[[ -n ${PIP_CONFIG_FILE:-} ]] && pip_files+=("$PIP_CONFIG_FILE")
IFS=: read -ra xdg <<<"${XDG_CONFIG_DIRS:-}"
for d in "${xdg[@]}"; do [[ -n $d ]] && pip_files+=("$d/pip/pip.conf"); done
paths=()
for f in "${pip_files[@]}"; do
    [[ -f $f ]] || continue
    mkdir -p "$M$(dirname "$f")"
    cp "$f" "$M$f"
    flog "pip: $f"
    # Values of the form /path or file:///path, on `key = value` lines.
    while IFS= read -r v; do paths+=("$v"); done < <(
        sed -n 's/^[^#;=]*=//p' "$f" | tr -s '[:blank:]' '\n' | sed -n 's|^file://||; \|^/|p'
    )
done
for kv in "${PIP_ENV[@]}"; do
    while IFS= read -r v; do paths+=("$v"); done < <(
        printf '%s\n' "${kv#*=}" | tr -s '[:blank:]' '\n' | sed -n 's|^file://||; \|^/|p'
    )
done
declare -A seen=()
for p in "${paths[@]}"; do
    p=${p%/}
    [[ -n $p ]] || continue
    # A local index's pages link to files beside it (simple/x/ -> ../../files/): the
    # folder that holds simple/ goes in whole.
    [[ ${p##*/} == simple && -d ${p%/*} ]] && p=${p%/*}
    [[ -n ${seen[$p]:-} ]] && continue
    seen[$p]=1
    if [[ -d $p ]]; then
        bind "$p" "$M$p" ro
        flog "pip: $p (read-only bind mount)"
    elif [[ -f $p ]]; then
        mkdir -p "$M$(dirname "$p")"
        cp -L "$p" "$M$p"
        flog "pip: $p (copied)"
    else
        flog "pip: $p is named by the pip configuration but does not exist here"
    fi
done

# ---- 3. the project: a fresh clone, nothing from this working tree ----------------------
git clone --quiet --no-hardlinks "$FRESH_REPO" "$M/src"
[[ -z ${FRESH_REF:-} ]] || git -C "$M/src" checkout --quiet "$FRESH_REF"
flog "cloned $FRESH_REPO at $(git -C "$M/src" log -1 --format='%h %s' | cut -c1-100)"

# ---- 4. make test inside -----------------------------------------------------------------
bind /proc "$M/proc"
bind /sys "$M/sys"
bind /dev "$M/dev"
bind /dev/shm "$M/dev/shm"
bind /dev/pts "$M/dev/pts"
flog "chroot $M: cd /src && make ${TARGETS[*]}"
t=$SECONDS
rc=0
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 TERM=dumb "${PIP_ENV[@]}" \
    chroot "$M" /bin/bash -c 'cd /src && make "$@"' make "${TARGETS[@]}" || rc=$?
MAKE_S=$((SECONDS - t))
flog "make ${TARGETS[*]} in the fresh machine: exit $rc after ${MAKE_S}s"
exit "$rc"
