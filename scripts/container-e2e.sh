#!/usr/bin/env bash
# make container-e2e: build Dockerfile.arm64 for linux/arm64 and run it, on an x86
# machine with no Docker engine and no registry (buildah + podman + qemu-user-static).
#
#   1. host tools from apt, binfmt_misc for arm64, the base image debian:bookworm-slim
#      built from an arm64 debootstrap (scripts/e2e/container-base.sh, cached);
#   2. buildah bud --platform linux/arm64 -f Dockerfile.arm64 (layers cached);
#   3. podman run it with a state volume, a mounted agent.toml and an env override, then:
#      the image's HEALTHCHECK passes, /status names the device, the bundled demo package
#      installed with `podman exec ... edge-agent install` is served and /predict answers
#      what scikit-learn answered, SIGTERM stops it with exit 0 and the answered
#      requests are in the SQLite buffer on the volume;
#   4. prints build time, image size and the container's RSS.
#
# Only this script knows about the sandbox: the host's CA bundle and a pip.conf reach pip
# in a bind-mounted /root at build time, and the host's CPU cache folders are hidden
# (onnxruntime >= 1.28 crashes on import under qemu when it reads x86 cache data). Users
# of Dockerfile.arm64 get neither. Needs root. Env: E2E_CACHE, E2E_PORT, E2E_KEEP=1
# (keep the container and volume for a look after a failure), E2E_PRUNE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/e2e/container-base.sh
. scripts/e2e/container-base.sh
# shellcheck source=scripts/e2e/container-broker.sh
. scripts/e2e/container-broker.sh

[[ $(id -u) == 0 ]] || {
    clog "needs root (debootstrap, binfmt_misc, rootful podman)"
    exit 1
}
# ---- 1a. host tools: every one this script and its helpers call ------------------------
# apt-get installs what is missing; a tool still missing stops here with its name.
# (coreutils, util-linux, findutils, grep, sed, mawk, tar are part of every Debian.)
cbase_host_tools   # buildah podman runc qemu-aarch64-static update-binfmts debootstrap
cbroker_host_tools # mosquitto mosquitto_passwd mosquitto_sub python3
need git git pip3 python3-pip
# pip in the build gets this host's CA bundle (below).
[[ -n ${PIP_CERT:-} || -f /etc/ssl/certs/ca-certificates.crt ]] || need_pkgs ca-certificates

VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
IMAGE=localhost/edge-agent:$VERSION
NAME=edge-agent-e2e-$$
VOLUME=edge-agent-e2e-state-$$
DEVICE=e2e-pi-$$
FLEET=e2e
PORT=${E2E_PORT:-$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
URL=http://127.0.0.1:$PORT
DEMO_MANIFEST=agent/demo/iris/manifest.json
WORK=$(mktemp -d /tmp/container-e2e.XXXXXX)
T0=$(date +%s)

PODMAN=(podman "${CSTORE_OPTS[@]}" --runtime runc --cgroup-manager cgroupfs --events-backend file)
podman_() { "${PODMAN[@]}" "$@"; }
buildah_() { buildah "${CSTORE_OPTS[@]}" "$@"; }
# podman's default rlimits are above what this sandbox allows a container to set.
run_() { podman_ run --arch arm64 --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"; }

cleanup() {
    local rc=$?
    if [[ ${E2E_KEEP:-0} == 1 && $rc != 0 ]]; then
        clog "E2E_KEEP=1: left container $NAME and volume $VOLUME (podman --root $CSTORE_ROOT --storage-driver vfs ...)"
    else
        podman_ rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
        podman_ volume rm -f "$VOLUME" >/dev/null 2>&1 || true
    fi
    cbroker_stop
    rm -rf "$WORK"
    ((rc == 0)) && clog "container e2e passed in $(($(date +%s) - T0))s" || clog "container e2e FAILED (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 1b. binfmt_misc and the base image -------------------------------------------------
e2e_binfmt
cbase_image_ensure

# ---- sandbox-only mounts ----------------------------------------------------------------
mkdir -p "$WORK/empty"
HIDE_CPU_CACHE=()
for cache in /sys/devices/system/cpu/cpu[0-9]*/cache; do
    [[ -d $cache ]] && HIDE_CPU_CACHE+=(--volume "$WORK/empty:$cache:ro")
done
# pip inside RUN steps reaches PyPI the way this host does: same CA bundle (this sandbox
# intercepts TLS), same index, no local wheel folders (x86 paths). It is handed over as
# root's home folder, mounted over the /root that the base image already has: buildah
# leaves an empty file behind for every mount point it has to create, and none is
# created here, so nothing of this sandbox ends up in the image.
mkdir -p "$WORK/root/.config/pip"
cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$WORK/root/e2e-ca.crt"
{
    echo "[global]"
    echo "cert = /root/e2e-ca.crt"
    echo "timeout = ${PIP_DEFAULT_TIMEOUT:-180}"
    # The index this host's pip uses (PIP_INDEX_URL first, then the config files);
    # `pip3 config get` fails both for "not set" and for real errors, `list` does not.
    index=$(pip3 config list | awk -F"'" '/^:env:\.index-url=/ {e = $2} /^global\.index-url=/ {g = $2} END {print (e != "" ? e : g)}')
    if [[ -n $index ]]; then echo "index-url = $index"; fi
} >"$WORK/root/.config/pip/pip.conf"

# ---- 2. build ----------------------------------------------------------------------------
clog "building $IMAGE for linux/arm64 (RUN steps under qemu)"
B0=$(date +%s)
REVISION=$(git rev-parse HEAD) || {
    clog "not a git checkout: the image's revision label says unknown"
    REVISION=unknown
}
buildah_ bud --isolation chroot --platform linux/arm64 --pull=never --layers --format docker \
    --file Dockerfile.arm64 --tag "$IMAGE" \
    --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$REVISION" \
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --volume "$WORK/root:/root" \
    "${HIDE_CPU_CACHE[@]}" \
    . >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    exit 1
}
BUILD_S=$(($(date +%s) - B0))
SIZE=$(podman_ image inspect --format '{{.Size}}' "$IMAGE")
ARCH=$(podman_ image inspect --format '{{.Architecture}}' "$IMAGE")
clog "built in ${BUILD_S}s: $IMAGE, $ARCH, $((SIZE / 1000000)) MB"
[[ $ARCH == arm64 ]] || {
    clog "image architecture is $ARCH, expected arm64"
    exit 1
}
# As root: /root is not readable by the agent's user, and `test ! -e` would pass blindly.
run_ --rm --no-healthcheck --user 0 --entrypoint /bin/sh "$IMAGE" -c \
    'for t in gcc cc g++ make; do command -v $t && exit 1; done
     for f in /root/e2e-ca.crt /root/.config/pip /etc/pip.conf; do test -e $f && echo $f && exit 1; done
     test "$(id -u edge-agent)" = 10001' ||
    {
        clog "the final image holds a compiler or the sandbox's pip settings"
        exit 1
    }

# ---- 3. run ------------------------------------------------------------------------------
[[ -f $DEMO_MANIFEST ]] || {
    clog "$DEMO_MANIFEST is missing: the image would have no demo model to serve"
    exit 1
}
cat >"$WORK/agent.toml" <<EOF
# Mounted read-only at /etc/edge-agent/agent.toml; the environment overrides device.id.
[device]
id = "from-the-file"
fleet = "$FLEET"

[health]
interval_s = 10
EOF
chmod 0644 "$WORK/agent.toml"
podman_ volume create "$VOLUME" >/dev/null
# A real broker with this device's account; the password reaches the agent as a
# read-only file owned by the image's user, the way docs/container.md tells users.
chmod 0755 "$WORK"
cbroker_start "$WORK/broker" "$DEVICE" "$FLEET"
install -m 0400 -o 10001 -g 10001 "$CBROKER_DEVICE_PW_FILE" "$WORK/mqtt-password"
clog "mosquitto (broker-config/) on port $CBROKER_PORT, account $DEVICE in fleet $FLEET"
cbroker_subscribe "edge/devices/$DEVICE/results" "$WORK/results.jsonl"
clog "starting $NAME on $URL"
run_ --detach --name "$NAME" \
    --publish "127.0.0.1:$PORT:8080" \
    --volume "$VOLUME:/var/lib/edge-agent" \
    --volume "$WORK/agent.toml:/etc/edge-agent/agent.toml:ro" \
    --env "EDGE_AGENT_DEVICE_ID=$DEVICE" \
    --env "EDGE_AGENT_MQTT_URL=mqtt://host.containers.internal:$CBROKER_PORT" \
    --env "EDGE_AGENT_MQTT_USERNAME=$DEVICE" \
    --env "EDGE_AGENT_MQTT_PASSWORD_FILE=/run/secrets/mqtt-password" \
    --volume "$WORK/mqtt-password:/run/secrets/mqtt-password:ro" \
    "${HIDE_CPU_CACHE[@]}" \
    "$IMAGE" >/dev/null
python3 scripts/e2e/container-check.py live "$URL" --timeout 300 || {
    podman_ logs "$NAME" 2>&1 | tail -n 30 >&2
    exit 1
}
# The image's own HEALTHCHECK command, run the way the engine runs it.
podman_ healthcheck run "$NAME" && clog "ok   podman healthcheck run: healthy" || {
    clog "podman healthcheck run failed; the same command through podman exec:"
    podman_ exec "$NAME" python3 -c "$(podman_ image inspect --format '{{index .Config.Healthcheck.Test 1}}' "$IMAGE")"
}
python3 scripts/e2e/container-check.py status "$URL" --device "$DEVICE"
python3 scripts/e2e/container-check.py broker "$URL" --timeout 120
ONLINE=$(cbroker_retained "edge/devices/$DEVICE/status")
[[ $ONLINE == *'"online"'* ]] || {
    clog "retained edge/devices/$DEVICE/status is ${ONLINE:-missing}, expected state online"
    exit 1
}
clog "ok   retained edge/devices/$DEVICE/status on the broker: online"
clog "edge-agent install /opt/edge-agent/demo/iris inside the running container"
timeout 600 "${PODMAN[@]}" exec "$NAME" edge-agent install /opt/edge-agent/demo/iris
python3 scripts/e2e/container-check.py predict "$URL" "$DEMO_MANIFEST" --timeout 300 || {
    podman_ logs "$NAME" 2>&1 | tail -n 30 >&2
    exit 1
}
for _ in 1 2 3 4 5; do python3 scripts/e2e/container-check.py predict "$URL" "$DEMO_MANIFEST" >/dev/null; done

PID=$(podman_ inspect --format '{{.State.Pid}}' "$NAME")
RSS_KB=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
STATS=$(podman_ stats --no-stream --format '{{.MemUsage}}' "$NAME" 2>/dev/null || echo "n/a")
clog "container RSS: $((RSS_KB / 1024)) MiB (VmRSS of the agent, qemu included), podman stats: $STATS"

clog "podman stop (SIGTERM)"
S0=$(date +%s)
podman_ stop -t 60 "$NAME" >/dev/null
EXIT=$(podman_ inspect --format '{{.State.ExitCode}}' "$NAME")
clog "stopped in $(($(date +%s) - S0))s with exit code $EXIT"
podman_ logs "$NAME" 2>&1 | tail -n 5 >&2
[[ $EXIT == 0 ]] || exit 1
OFFLINE=$(cbroker_retained "edge/devices/$DEVICE/status")
[[ $OFFLINE == *'"offline"'* ]] || {
    clog "after stop, retained edge/devices/$DEVICE/status is ${OFFLINE:-missing}, expected offline"
    exit 1
}
clog "ok   retained edge/devices/$DEVICE/status after stop: offline"
# Every answered request is accounted for after SIGTERM: delivered to the broker's
# results topic, or committed to the SQLite buffer on the volume for the next start.
sleep 1
cbroker_subscribed || exit 1
cbroker_stop
DELIVERED=$(python3 -c 'import json, sys; print(sum(len(json.loads(l)["results"]) for l in open(sys.argv[1]) if l.strip()))' "$WORK/results.jsonl")
BUFFERED=$(run_ --rm --no-healthcheck --volume "$VOLUME:/var/lib/edge-agent" --entrypoint python3 "$IMAGE" -c \
    "import sqlite3; print(sqlite3.connect('/var/lib/edge-agent/buffer.db').execute('select count(*) from results').fetchone()[0])")
clog "results: $DELIVERED delivered on edge/devices/$DEVICE/results, $BUFFERED left in the buffer on the volume"
((DELIVERED + BUFFERED >= 6)) || {
    clog "expected at least 6 results (one per /predict call), found $((DELIVERED + BUFFERED))"
    exit 1
}

# The layer cache is what makes the next run fast; with vfs every layer is a full copy,
# so it grows by about a gigabyte per code change. E2E_PRUNE=1 drops what the last
# build does not use (the builder's dependency layer too).
[[ ${E2E_PRUNE:-0} == 1 ]] && podman_ image prune -f >/dev/null
printf '\nbuild %ss | image %s MB (%s) | RSS %s MiB | total %ss\n' \
    "$BUILD_S" "$((SIZE / 1000000))" "$ARCH" "$((RSS_KB / 1024))" "$(($(date +%s) - T0))"
