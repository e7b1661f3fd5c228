#!/usr/bin/env bash
# A real mosquitto on the host for the container e2e, configured by the project's own
# broker-config/ scripts (mkconf.sh, mkcreds.sh): accounts, ACL, no anonymous access.
# The container reaches it as host.containers.internal, so it listens on all
# interfaces of this host for the few seconds of the check.
#
#   . scripts/e2e/container-broker.sh
#   cbroker_start DIR DEVICE FLEET   # sets CBROKER_PORT, CBROKER_PID, CBROKER_DEVICE_PW_FILE
#   cbroker_retained TOPIC           # the retained payload, read as the operator
#   cbroker_subscribe TOPIC FILE     # every payload on TOPIC into FILE, one a line
#   cbroker_stop
set -euo pipefail

cbroker_start() {
    local dir=$1 device=$2 fleet=$3 out
    # mosquitto drops from root to its own user: it must reach the folder.
    mkdir -p "$dir/creds"
    chmod 0755 "$dir"
    CBROKER_DIR=$dir
    CBROKER_PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
    broker-config/mkconf.sh --conf-dir "$dir/conf" --data-dir "$dir/data" \
        --port "$CBROKER_PORT" --bind 0.0.0.0 --log-dest stderr >/dev/null
    out=$(broker-config/mkcreds.sh --conf-dir "$dir/conf" --out "$dir/creds" operator e2e-operator)
    CBROKER_OPERATOR_PW=$(cat "$(tail -n1 <<<"$out")")
    out=$(broker-config/mkcreds.sh --conf-dir "$dir/conf" --out "$dir/creds" device "$device" --fleet "$fleet")
    CBROKER_DEVICE_PW_FILE=$(tail -n1 <<<"$out")
    mosquitto -c "$dir/conf/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
    CBROKER_PID=$!
    local i
    for i in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$CBROKER_PORT") 2>/dev/null && return 0
        kill -0 "$CBROKER_PID" 2>/dev/null || break
        sleep 0.2
    done
    clog "mosquitto did not start:"
    cat "$dir/mosquitto.log" >&2
    return 1
}

# The retained message on TOPIC (empty if none within 5 s).
cbroker_retained() {
    mosquitto_sub -h 127.0.0.1 -p "$CBROKER_PORT" -u e2e-operator -P "$CBROKER_OPERATOR_PW" \
        -t "$1" -C 1 -W 5 --retained-only 2>/dev/null || true
}

cbroker_subscribe() {
    mosquitto_sub -h 127.0.0.1 -p "$CBROKER_PORT" -u e2e-operator -P "$CBROKER_OPERATOR_PW" \
        -i e2e-results -q 1 -t "$1" >"$2" 2>&1 &
    CBROKER_SUB_PID=$!
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
