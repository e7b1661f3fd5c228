#!/usr/bin/env bash
# `make pi-e2e`: the agent on a real arm64 systemd, emulated on this machine.
#
#   1. an arm64 Debian bookworm rootfs (debootstrap --foreign + qemu-user-static),
#      cached in /var/cache/edge-agent-e2e (scripts/e2e/arm64-rootfs.sh)
#   2. scripts/install-pi.sh inside it: venv in /opt/edge-agent, the project's wheel and
#      its arm64 wheels from PyPI, the unit from systemd/
#   3. boot the rootfs's own systemd (systemd-nspawn -b), install a signed model, start
#      the unit, wait for READY=1
#   4. from the host: /predict answers what scikit-learn answers; a model published
#      with `edge-fleet publish` to a mosquitto on the host reaches the agent; the
#      health report arrives; `edge-fleet status` lists the device; a SIGSTOPped agent
#      misses its watchdog pings and systemd restarts it; `systemctl stop` is clean.
#
# Needs root. The container shares the host's network, so host and device meet on
# 127.0.0.1. Always tears down (container powered off, mosquitto stopped, no mounts
# left). Prints the time of every step. Environment: E2E_CACHE (rootfs cache),
# E2E_KEEP=1 (keep the work folder), E2E_BOOT_TIMEOUT / E2E_READY_TIMEOUT (seconds).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/e2e/arm64-rootfs.sh
. "$ROOT/scripts/e2e/arm64-rootfs.sh"

PY=${PY:-$ROOT/.venv/bin/python}
FLEET=${FLEET:-$ROOT/.venv/bin/edge-fleet}
# Emulation runs Python ~70x slower than a Pi: boot, imports and model loads get minutes.
BOOT_TIMEOUT=${E2E_BOOT_TIMEOUT:-600}
READY_TIMEOUT=${E2E_READY_TIMEOUT:-900}
DEVICE=pi-e2e
FLEET_NAME=e2e
MACHINE=edge-pi-e2e

WORK=$(mktemp -d /tmp/edge-pi-e2e.XXXXXX)
R=""
NSPAWN_PID=""
LEADER=""
MOSQ_PID=""
T_START=$SECONDS
T_STEP=$SECONDS
STEP_NAME=""
TIMINGS=()

step() {
    local now=$SECONDS
    if [[ -n ${STEP_NAME:-} ]]; then
        TIMINGS+=("$(printf '%5ds  %s' $((now - T_STEP)) "$STEP_NAME")")
    fi
    STEP_NAME=$1
    T_STEP=$now
    e2e_log "== $1"
}

fail() {
    e2e_log "FAIL: $*"
    if [[ -n $LEADER ]]; then
        e2e_log "--- edge-agent journal (last 60 lines)"
        in_device journalctl -u edge-agent --no-pager -n 60 -o short-monotonic >&2 || true
    fi
    exit 1
}

# Run a command inside the booted container (all its namespaces), clean environment.
in_device() {
    nsenter -t "$LEADER" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

unit_prop() { in_device systemctl show -p "$1" --value edge-agent.service; }

# Poll `cmd` every 2 s until it succeeds or `secs` pass.
wait_until() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for $what"
        sleep 2
    done
}

teardown() {
    local rc=$?
    set +e
    step teardown
    if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # Not SIGTERM to nspawn: its SIGRTMIN+4 reaches the emulated systemd as
        # SIGRTMIN+1 (qemu-user shifts real-time signals), which means "rescue mode".
        # Asking the container's systemd directly works.
        if [[ -n $LEADER ]]; then
            in_device systemctl poweroff --no-block >/dev/null 2>&1 || kill -TERM "$NSPAWN_PID"
        else
            kill -TERM "$NSPAWN_PID"
        fi
        for _ in $(seq 90); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            e2e_log "container did not power off within 90 s: killing it"
            kill -KILL "$NSPAWN_PID"
        fi
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    # The container's init outlives a killed nspawn (it is re-parented, not killed);
    # killing it ends everything in its PID namespace.
    if [[ -n $LEADER ]] && kill -0 "$LEADER" 2>/dev/null; then
        kill -KILL "$LEADER"
        sleep 1
    fi
    if [[ -n $MOSQ_PID ]]; then
        kill -TERM "$MOSQ_PID" 2>/dev/null
        wait "$MOSQ_PID" 2>/dev/null
    fi
    # Anything still mounted below the rootfs (an interrupted chroot step) goes too.
    grep -o " $R/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l
    if grep -q " $R" /proc/mounts; then
        e2e_log "WARNING: mounts left below $R"
        rc=1
    fi
    if [[ ${E2E_KEEP:-0} == 1 ]]; then
        e2e_log "work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    step "done"
    echo "pi-e2e timings:"
    printf '  %s\n' "${TIMINGS[@]}"
    printf '  %5ds  total\n' $((SECONDS - T_START))
    ((rc == 0)) && echo "pi-e2e: PASSED" || echo "pi-e2e: FAILED (exit $rc)"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

[[ $(id -u) == 0 ]] || { echo "pi-e2e: needs root (debootstrap, chroot, systemd-nspawn)" >&2; exit 1; }
[[ -x $PY && -x $FLEET ]] || { echo "pi-e2e: run scripts/setup.sh first (needs $PY and $FLEET)" >&2; exit 1; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port)
MQTT_PORT=$(free_port)
BROKER=mqtt://127.0.0.1:$MQTT_PORT

# --- 1. rootfs -------------------------------------------------------------------------
step "1. arm64 bookworm rootfs (debootstrap + qemu, or the cache)"
e2e_rootfs_ensure
# The device gets its own copy of the shared base rootfs (other e2e targets reuse the
# base), made once and kept: its venv and pip cache make the next run quick.
R=${E2E_PI_ROOT:-$E2E_CACHE/pi-device}
if [[ ! -f $R/.edge-e2e-base ]]; then
    rm -rf "$R.partial"
    cp -a "$E2E_ROOTFS" "$R.partial"
    mv "$R.partial" "$R"
fi
e2e_rootfs_network "$R"
# A container left over from an interrupted run would hold the rootfs.
if pgrep -f "systemd-nspawn .*--machine=$MACHINE" >/dev/null; then
    fail "another pi-e2e container is running (pgrep -af $MACHINE)"
fi

# --- 2. the project's wheel and its arm64 dependencies --------------------------------
step "2a. wheel and signed model packages (host)"
mkdir -p "$WORK/src"
# The working tree as it is (tracked and new files, not ignored ones), outside the
# checkout so the build leaves no build/ or *.egg-info behind in it.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK/src")
(cd "$WORK/src" && "$PY" -m pip wheel -q --no-deps -w "$WORK/src/dist" .)
WHEEL=$(ls "$WORK"/src/dist/edge_agent-*.whl)
"$PY" "$ROOT/scripts/e2e/make-packages.py" "$WORK/pkgs" >/dev/null

step "2b. install-pi.sh inside the arm64 rootfs (pip under qemu)"
# Fresh device state every run; the venv and pip's cache stay, so a re-run is quick.
rm -rf "$R/var/lib/private/edge-agent" "$R/var/lib/edge-agent" "$R/etc/edge-agent" \
    "$R/root/edge-src" "$R/srv/e2e-pkgs" "$R/etc/systemd/system/edge-agent.service.d"
rm -rf "$R"/var/log/journal/*
cp -a "$WORK/src" "$R/root/edge-src"
# /srv, not /root or /tmp: readable by the dynamic user that installs them.
cp -r "$WORK/pkgs" "$R/srv/e2e-pkgs"
chmod -R a+rX "$R/srv/e2e-pkgs"
install -d -m 0755 "$R/etc/edge-agent"
install -m 0644 "$WORK/pkgs/keys/publisher.pub" "$R/etc/edge-agent/publisher.pub"
cat >"$R/etc/edge-agent/agent.toml" <<EOF
# Written by scripts/pi-e2e.sh before install-pi.sh, which must leave it alone.
# The unit's StateDirectory, named here too so that edge-agent install run by hand
# writes the same store the service reads.
state_dir = "/var/lib/edge-agent"

[device]
id = "$DEVICE"
fleet = "$FLEET_NAME"

[mqtt]
url = "$BROKER"

[http]
host = "127.0.0.1"
port = $HTTP_PORT

[models]
trusted_keys = ["/etc/edge-agent/publisher.pub"]

[health]
interval_s = 10
EOF
# env -i: the host's PIP_*/REQUESTS_CA_BUNDLE point at host paths. PIP_CERT: the
# sandbox intercepts TLS with its own CA, which e2e_rootfs_network put into the
# rootfs's store; pip (certifi) would not look there otherwise.
e2e_chroot "$R" /usr/bin/env PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DEFAULT_TIMEOUT=180 \
    /root/edge-src/scripts/install-pi.sh --wheel "/root/edge-src/dist/$(basename "$WHEEL")" \
    --no-start | tee "$WORK/install.log"
grep -q "agent.toml exists: left as it is" "$WORK/install.log" ||
    fail "install-pi.sh overwrote an existing /etc/edge-agent/agent.toml"
# What this sandbox cannot do (docs/raspberry-pi.md, "What the e2e does not prove"):
#   PrivateUsers=, PrivateIPC=: user/IPC namespaces fail under qemu-user here;
#   LoadCredential=: systemd's credential mount fails (EINVAL) for every unit here;
#   slower start: Python under emulation needs minutes, not seconds.
mkdir -p "$R/etc/systemd/system/edge-agent.service.d"
cat >"$R/etc/systemd/system/edge-agent.service.d/e2e.conf" <<EOF
[Service]
PrivateUsers=no
PrivateIPC=no
LoadCredential=
TimeoutStartSec=${READY_TIMEOUT}s
EOF

# --- 3. boot, install a model, start the unit, READY ------------------------------------
step "3a. mosquitto on the host, boot the rootfs's systemd (nspawn)"
cat >"$WORK/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
EOF
# stderr, not a log file: mosquitto drops root for its own user, which cannot write
# into the 0700 work folder.
mosquitto -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
MOSQ_PID=$!
# onnxruntime >= 1.28 crashes under qemu when it reads the host's x86 cache topology
# from sysfs; an empty tmpfs over each cpu*/cache hides it (only in the container).
hide=()
for d in /sys/devices/system/cpu/cpu*/cache; do hide+=(--tmpfs="$d"); done
systemd-nspawn --register=no --keep-unit --quiet --boot --directory="$R" \
    --machine="$MACHINE" --hostname="$DEVICE" "${hide[@]}" </dev/null >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!
find_leader() {
    local pid
    for pid in $(pgrep -P "$NSPAWN_PID"); do
        grep -q systemd "/proc/$pid/cmdline" 2>/dev/null && { LEADER=$pid; return 0; }
    done
    return 1
}
wait_until 60 "the container's systemd to start" find_leader
system_up() {
    local state
    state=$(in_device systemctl is-system-running 2>/dev/null) || true
    [[ $state == running || $state == degraded ]]
}
wait_until "$BOOT_TIMEOUT" "the container to finish booting" system_up
e2e_log "container booted: $(in_device systemctl is-system-running 2>&1 || true)"

step "3b. started at boot with no model; edge-agent install (signed iris 1.0.0)"
# install-pi.sh enabled the unit, so the boot started it: READY without a model.
wait_until "$READY_TIMEOUT" "edge-agent to start at boot" \
    test "$(unit_prop ActiveState)" = active
e2e_log "at boot: $(unit_prop StatusText)"
# By hand, a package is installed as the service's own (dynamic) user, so the files
# it writes are the service's: same User= name, same UID (docs/raspberry-pi.md).
in_device systemd-run --quiet --wait --pipe --collect --unit=edge-agent-install \
    -p DynamicUser=yes -p User=edge-agent -p StateDirectory=edge-agent \
    /opt/edge-agent/bin/edge-agent install /srv/e2e-pkgs/iris-1.0.0 \
    --config /etc/edge-agent/agent.toml ||
    fail "edge-agent install failed inside the device"
# The running agent notices the new active version by itself (store-watch).
serving_v1() { [[ $(unit_prop StatusText) == *"serving iris 1.0.0"* ]]; }
wait_until 120 "the running agent to serve iris 1.0.0" serving_v1

step "3c. systemctl restart edge-agent until READY=1 (with a model to load)"
t0=$SECONDS
timeout $((READY_TIMEOUT + 30)) nsenter -t "$LEADER" -a env -i PATH=/usr/bin:/bin \
    systemctl restart edge-agent.service || fail "systemctl restart edge-agent failed"
[[ $(unit_prop ActiveState) == active ]] || fail "edge-agent is $(unit_prop ActiveState)"
STATUS_TEXT=$(unit_prop StatusText)
e2e_log "READY after $((SECONDS - t0))s; StatusText: $STATUS_TEXT"
[[ $STATUS_TEXT == *"serving iris 1.0.0"* ]] || fail "StatusText does not show iris 1.0.0: $STATUS_TEXT"
in_device systemctl status edge-agent.service --no-pager -n 0 || true

# --- 4. from the host --------------------------------------------------------------------
step "4a. /predict from the host answers what scikit-learn answers"
check_predict() {
    "$PY" - "$HTTP_PORT" "$WORK/pkgs/expected.json" "$1" <<'EOF'
import json, sys, urllib.request
port, expected_path, version = sys.argv[1], sys.argv[2], sys.argv[3]
expected = json.load(open(expected_path))
req = urllib.request.Request(
    f"http://127.0.0.1:{port}/predict",
    data=json.dumps({"features": expected["rows"]}).encode(),
    headers={"Content-Type": "application/json"},
)
body = json.load(urllib.request.urlopen(req, timeout=120))
assert body.get("version", version) == version, f"version {body.get('version')}, expected {version}"
assert body["prediction"] == expected[version], f"{body['prediction']} != sklearn {expected[version]}"
print(f"/predict (iris {version}): {body['prediction']}")
EOF
}
check_predict 1.0.0 || fail "/predict did not answer like scikit-learn"

step "4b. health report and edge-fleet status from the host broker"
"$PY" - "$MQTT_PORT" "$DEVICE" <<'EOF' || fail "no health report from the device"
import json, sys, threading
import paho.mqtt.client as mqtt
port, device = int(sys.argv[1]), sys.argv[2]
got = threading.Event()
report = {}
def on_message(client, userdata, msg):
    report.update(json.loads(msg.payload))
    got.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.on_connect = lambda c, *a: c.subscribe(f"edge/devices/{device}/health", qos=1)
c.on_message = on_message
c.connect("127.0.0.1", port)
c.loop_start()
ok = got.wait(300)
c.loop_stop()
assert ok, "no health report within 300 s"
assert report.get("device") == device, report
print("health:", {k: report.get(k) for k in ("device", "agent_version", "uptime_s", "cpu_percent", "models")})
EOF
"$FLEET" status --fleet "$FLEET_NAME" --broker "$BROKER" | tee "$WORK/fleet-status.txt"
grep -q "$DEVICE" "$WORK/fleet-status.txt" || fail "edge-fleet status does not list $DEVICE"

step "4c. edge-fleet publish iris 1.1.0 -> the device activates it"
"$FLEET" publish "$WORK/pkgs/iris-1.1.0" --fleet "$FLEET_NAME" --broker "$BROKER" \
    --signing-key "$WORK/pkgs/keys/publisher.key" ||
    fail "edge-fleet publish failed"
active_version() {
    "$PY" -c '
import json, sys, urllib.request
s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/status", timeout=30))
v = s["models"]["iris"]["version"]
sys.exit(0 if v == sys.argv[2] else 1)' "$HTTP_PORT" "$1"
}
wait_until 600 "iris 1.1.0 to become active on the device" active_version 1.1.0
check_predict 1.1.0 || fail "/predict after the update did not answer like scikit-learn"

step "4d. watchdog: a frozen agent is restarted by systemd"
MAIN_PID=$(unit_prop MainPID)
RESTARTS=$(unit_prop NRestarts)
in_device kill -STOP "$MAIN_PID"
restarted() { (($(unit_prop NRestarts) > RESTARTS)); }
wait_until 180 "systemd to restart the frozen agent" restarted
# Read whole, then searched: `journalctl | grep -m1` under pipefail fails when grep stops
# reading early and journalctl dies of SIGPIPE, however well the match went.
in_device journalctl -u edge-agent --no-pager -o cat >"$WORK/journal-watchdog.txt" ||
    fail "journalctl inside the device failed"
grep -m1 -i "watchdog timeout" "$WORK/journal-watchdog.txt" ||
    fail "the restart was not caused by the watchdog"
active_again() { [[ $(unit_prop ActiveState) == active && $(unit_prop MainPID) != "$MAIN_PID" ]]; }
wait_until "$READY_TIMEOUT" "the restarted agent to be READY" active_again
check_predict 1.1.0 || fail "/predict after the watchdog restart"

step "4e. systemctl stop: STOPPING=1, buffer flushed, exit 0"
in_device systemctl stop edge-agent.service
RESULT=$(unit_prop Result)
in_device journalctl -u edge-agent --no-pager -o cat -n 30 >"$WORK/journal-stop.txt" ||
    fail "journalctl inside the device failed"
grep -q "edge-agent stopped" "$WORK/journal-stop.txt" ||
    fail "no clean shutdown in the journal"
[[ $RESULT == success ]] || fail "stop result $RESULT (expected success)"
e2e_log "stopped cleanly (Result=$RESULT)"
