#!/usr/bin/env bash
# A real mosquitto on the host for the container e2e, configured by the project's own
# broker-config/ scripts (mkconf.sh, mkcreds.sh): accounts, ACL, no anonymous access.
# The container reaches it as host.containers.internal, so it listens on all
# interfaces of this host for the few seconds of the check.
#
#   . scripts/e2e/container-broker.sh
#   cbroker_start DIR DEVICE FLEET   # sets CBROKER_PORT (devices), CBROKER_OPERATOR_PORT,
#                                    # CBROKER_PID, CBROKER_DEVICE_PW_FILE
#   cbroker_retained TOPIC           # the retained payload, read as the operator
#   cbroker_subscribe TOPIC FILE     # every payload on TOPIC into FILE, one a line
#   cbroker_stop
#
# Host tools: mosquitto and mosquitto_passwd (Debian mosquitto), mosquitto_sub (Debian
# mosquitto-clients: not pulled in by mosquitto), python3; cbroker_host_tools installs
# them.
set -euo pipefail
# shellcheck source=scripts/e2e/need.sh
. "$(dirname "${BASH_SOURCE[0]}")/need.sh"

cbroker_host_tools() {
    need mosquitto mosquitto mosquitto_passwd mosquitto mosquitto_sub mosquitto-clients \
        python3 python3
}

cbroker_start() {
    local dir=$1 device=$2 fleet=$3 out
    # mosquitto drops from root to its own user: it must reach the folder.
    mkdir -p "$dir/creds"
    chmod 0755 "$dir"
    CBROKER_DIR=$dir
    CBROKER_PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
    CBROKER_OPERATOR_PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
    # Devices on all interfaces (the container), the operator listener on loopback.
    broker-config/mkconf.sh --conf-dir "$dir/conf" --data-dir "$dir/data" \
        --port "$CBROKER_PORT" --bind 0.0.0.0 \
        --operator-port "$CBROKER_OPERATOR_PORT" --operator-bind 127.0.0.1 \
        --log-dest stderr >/dev/null
    out=$(broker-config/mkcreds.sh --conf-dir "$dir/conf" --out "$dir/creds" operator e2e-operator)
    CBROKER_OPERATOR_PW=$(cat "$(tail -n1 <<<"$out")")
    out=$(broker-config/mkcreds.sh --conf-dir "$dir/conf" --out "$dir/creds" device "$device" --fleet "$fleet")
    # shellcheck disable=SC2034  # read by the caller
    CBROKER_DEVICE_PW_FILE=$(tail -n1 <<<"$out")
    mosquitto -c "$dir/conf/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
    CBROKER_PID=$!
    local i
    for i in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$CBROKER_PORT") 2>/dev/null &&
            (exec 3<>"/dev/tcp/127.0.0.1/$CBROKER_OPERATOR_PORT") 2>/dev/null && return 0
        kill -0 "$CBROKER_PID" 2>/dev/null || break
        sleep 0.2
    done
    clog "mosquitto did not start:"
    cat "$dir/mosquitto.log" >&2
    return 1
}

# The retained message on TOPIC: empty if the broker holds none (mosquitto_sub times
# out after 5 s, exit 27); any other failure (no mosquitto_sub, refused, not
# authorised) fails with mosquitto_sub's own message.
cbroker_retained() {
    local out rc=0
    out=$(mosquitto_sub -h 127.0.0.1 -p "$CBROKER_OPERATOR_PORT" -u e2e-operator -P "$CBROKER_OPERATOR_PW" \
        -t "$1" -C 1 -W 5 --retained-only 2>"$CBROKER_DIR/retained.err") || rc=$?
    case $rc in
        0) printf '%s\n' "$out" ;;
        27) ;;
        *)
            clog "mosquitto_sub reading the retained $1 failed (exit $rc): $(cat "$CBROKER_DIR/retained.err")"
            return 1
            ;;
    esac
}

# Payloads only in FILE; mosquitto_sub's errors go to its own log, so a failure shows
# as itself and not as a line of bad JSON. cbroker_subscribed checks it is still there.
cbroker_subscribe() {
    mosquitto_sub -h 127.0.0.1 -p "$CBROKER_OPERATOR_PORT" -u e2e-operator -P "$CBROKER_OPERATOR_PW" \
        -i e2e-results -q 1 -t "$1" >"$2" 2>"$CBROKER_DIR/subscribe.log" &
    CBROKER_SUB_PID=$!
    sleep 1
    cbroker_subscribed
}

cbroker_subscribed() {
    kill -0 "$CBROKER_SUB_PID" 2>/dev/null || {
        wait "$CBROKER_SUB_PID" || clog "mosquitto_sub exited with $?"
        clog "the results subscriber is gone: $(cat "$CBROKER_DIR/subscribe.log")"
        return 1
    }
}

cbroker_stop() {
    if [[ -n ${CBROKER_SUB_PID:-} ]]; then
        kill "$CBROKER_SUB_PID" 2>/dev/null || true
        wait "$CBROKER_SUB_PID" 2>/dev/null || true
        CBROKER_SUB_PID=""
    fi
    [[ -n ${CBROKER_PID:-} ]] || return 0
    kill "$CBROKER_PID" 2>/dev/null || true
    wait "$CBROKER_PID" 2>/dev/null || true
    CBROKER_PID=""
}
