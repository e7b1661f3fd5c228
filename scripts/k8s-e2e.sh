#!/usr/bin/env bash
# make k8s-e2e: the central side's containers and Kubernetes manifests, checked and run
# for real on one machine with no cluster, no Docker engine and no registry.
#
#   1. a venv of its own with kubernetes-validate, checkov, podman-compose and jsonschema
#      (scripts/e2e/k8s-tools.txt; cached under E2E_CACHE, made while the images build);
#   2. deploy/kubernetes/monitoring.yaml is up to date with prometheus/ and the dashboard;
#   3. the three central images are built from the debootstrap bookworm-slim base
#      (scripts/e2e/central-images.sh): no compiler or pip, non-root, a HEALTHCHECK; size;
#   4. every manifest (and mksecrets.sh's Secrets) validates against the Kubernetes
#      schemas (kubernetes-validate, offline) and passes checkov's Kubernetes and
#      Dockerfile checks; the findings that stay are skipped on their object with the
#      reason (docs/kubernetes.md, "Scanner findings");
#   5. `podman kube play` runs the central stack from the same manifests
#      (scripts/e2e/kube-play-input.py: the small transformation podman 4.3 needs), a
#      real agent (.venv/bin/edge-agent) connects to that broker, receives a model
#      published with `edge-fleet publish`, serves predictions, the results land in that
#      PostgreSQL (psql) and leave the agent's buffer, both collectors of the shared
#      subscription are connected, the exporter lists the device; a restarted exporter
#      and collector give the image's start-up time; `podman kube down` ends it;
#   6. deploy/compose.yaml: validated against the compose specification's JSON schema,
#      then started with podman-compose (scripts/e2e/compose-check.sh).
#
# Needs root (debootstrap, rootful podman). Env: E2E_CACHE, E2E_KEEP=1 (leave the pods
# after a failure), K8S_E2E_SKIP_COMPOSE=1, K8S_VERSION (schemas, default 1.30.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=scripts/e2e/central-images.sh
. scripts/e2e/central-images.sh
klog() { printf '[k8s-e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

[[ $(id -u) == 0 ]] || {
    klog "needs root (debootstrap, rootful podman)"
    exit 1
}
T0=$(date +%s)
# ---- host tools --------------------------------------------------------------------------
# python3-venv for the tools' venv; mosquitto_passwd for mksecrets.sh (broker-config's
# mkcreds.sh); psql to query the PostgreSQL of the stack; openssl for mkca.sh.
need mosquitto_passwd mosquitto psql postgresql-client openssl openssl python3 python3
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_pkgs python3-venv
[[ -x .venv/bin/edge-agent && -x .venv/bin/edge-fleet ]] || {
    klog ".venv/bin/edge-agent is missing: run make setup first (make k8s-e2e does)"
    exit 1
}

WORK=$(mktemp -d /tmp/k8s-e2e.XXXXXX)
chmod 0755 "$WORK"
export CONTAINERS_CONF=$WORK/containers.conf
# podman's default rlimits are above what this sandbox lets a container set (as in
# container-e2e); crun fails here, runc works; no systemd for cgroups and events.
cat >"$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
log_driver = "k8s-file"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
CONF
PODMAN=(podman "${CSTORE_OPTS[@]}")
podman_() { "${PODMAN[@]}" "$@"; }
PLAY=$WORK/play.yaml
AGENT_PID=""
cleanup() {
    local rc=$?
    if [[ -n ${TOOLS_PID:-} ]]; then kill "$TOOLS_PID" 2>/dev/null || true; fi
    if [[ -n $AGENT_PID ]]; then
        kill "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    if [[ ${E2E_KEEP:-0} == 1 && $rc != 0 ]]; then
        klog "E2E_KEEP=1: left the pods of $PLAY (CONTAINERS_CONF=$CONTAINERS_CONF podman ${CSTORE_OPTS[*]} pod ps)"
    else
        if [[ -f $PLAY ]]; then
            if ((rc != 0)); then
                for c in $(podman_ ps -a --format '{{.Names}}' 2>/dev/null | grep -v infra); do
                    echo "--- $c" >&2
                    podman_ logs --tail 15 "$c" >&2 2>&1 || true
                done
            fi
            podman_ kube down "$PLAY" >/dev/null 2>&1 || true
            podman_ volume rm -f data-mosquitto-0 data-postgres-0 >/dev/null 2>&1 || true
        fi
        rm -rf "$WORK"
    fi
    ((rc == 0)) && klog "k8s e2e passed in $(($(date +%s) - T0))s" || klog "k8s e2e FAILED (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
until_ok() { # until_ok SECONDS WHAT COMMAND...: retry COMMAND until it succeeds
    local limit=$1 what=$2 t
    shift 2
    t=$(date +%s)
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) - t < limit)) || {
            klog "timed out after ${limit}s waiting for $what"
            return 1
        }
        sleep 0.5
    done
}

# ---- 1. tools venv (in the background, while the images build) ---------------------------
TOOLS_KEY=$(sha256sum scripts/e2e/k8s-tools.txt | cut -c1-12)
TOOLS=$E2E_CACHE/k8s-tools-$TOOLS_KEY
TPY=$TOOLS/bin/python
tools_venv() {
    local i0
    i0=$(date +%s)
    rm -rf "$TOOLS.partial"
    /usr/bin/python3 -m venv "$TOOLS.partial"
    "$TOOLS.partial/bin/pip" install -q --disable-pip-version-check -r scripts/e2e/k8s-tools.txt
    # A venv is not relocatable: made under a twin name, moved, its scripts fixed.
    rm -rf "$TOOLS"
    mv "$TOOLS.partial" "$TOOLS"
    grep -rlI --null "$TOOLS.partial" "$TOOLS/bin" | xargs -0 sed -i "s|$TOOLS.partial|$TOOLS|g"
    echo "$(($(date +%s) - i0))" >"$WORK/tools.seconds"
}
TOOLS_PID=""
mkdir -p "$E2E_CACHE"
if [[ -x $TOOLS/bin/checkov ]]; then
    klog "tools venv cached: $TOOLS"
else
    klog "making the tools venv $TOOLS (kubernetes-validate, checkov, podman-compose, jsonschema) in the background"
    tools_venv >"$WORK/tools.log" 2>&1 &
    TOOLS_PID=$!
fi

# ---- 2. monitoring ConfigMaps ---------------------------------------------------------------
python3 scripts/e2e/k8s-monitoring.py --check
klog "ok   deploy/kubernetes/monitoring.yaml matches prometheus/edge-alerts.yml and docs/grafana-dashboard.json"

# ---- 3. images ---------------------------------------------------------------------------
central_images_build
podman_ run --rm --no-healthcheck --user 0 --entrypoint /bin/sh "$CENTRAL_IMAGE" -c \
    'for t in gcc cc g++ make pip pip3; do command -v $t && exit 1; done; test "$(id -u edge-fleet)" = 10001' >/dev/null || {
    klog "$CENTRAL_IMAGE holds a compiler or pip, or its user is not 10001"
    exit 1
}
USER_OF=$(podman_ image inspect --format '{{.Config.User}}' "$CENTRAL_IMAGE")
HEALTH=$(podman_ image inspect --format '{{.Config.Healthcheck.Test}}' "$CENTRAL_IMAGE")
[[ $USER_OF == 10001:10001 && $HEALTH == *metrics* ]] || {
    klog "$CENTRAL_IMAGE: user '$USER_OF', healthcheck '$HEALTH': expected 10001:10001 and a /metrics check"
    exit 1
}
klog "ok   $CENTRAL_IMAGE: $((CENTRAL_SIZE / 1000000)) MB, user $USER_OF, no compiler or pip, HEALTHCHECK on /metrics"
((CENTRAL_SIZE < 150000000)) || klog "note: $CENTRAL_IMAGE is $((CENTRAL_SIZE / 1000000)) MB, above the 150 MB goal"

# ---- 4. schemas and scan ------------------------------------------------------------------
if [[ -n $TOOLS_PID ]]; then
    wait "$TOOLS_PID" || {
        tail -n 20 "$WORK/tools.log" >&2
        klog "making the tools venv failed (above)"
        exit 1
    }
    TOOLS_PID=""
    klog "tools venv made in $(cat "$WORK/tools.seconds")s (alongside the image builds)"
fi
DEVICE=k8s-pi-$$
FLEET=k8s
deploy/kubernetes/mksecrets.sh --out "$WORK/secrets" --device "$DEVICE" --fleet "$FLEET" >/dev/null
mapfile -t MANIFESTS < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml ! -path '*/secrets/*' | sort)
K8S_VERSION=${K8S_VERSION:-1.30.0}
"$TOOLS/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" --quiet \
    "${MANIFESTS[@]}" "$WORK/secrets/secrets.yaml" || {
    klog "a manifest does not validate against the Kubernetes $K8S_VERSION schemas (above)"
    exit 1
}
klog "ok   ${#MANIFESTS[@]} manifests and the Secrets validate against the Kubernetes $K8S_VERSION schemas (strict)"
S0=$(date +%s)
"$TOOLS/bin/checkov" --quiet --compact --framework kubernetes dockerfile \
    -d deploy -f Dockerfile.arm64 --skip-download >"$WORK/checkov.txt" 2>&1 || {
    cat "$WORK/checkov.txt" >&2
    klog "checkov found what the manifests or Dockerfiles must fix (or skip with a reason)"
    exit 1
}
klog "ok   checkov: no failed check ($(grep -ho 'Passed checks: [0-9]*' "$WORK/checkov.txt" | awk '{s += $3} END {print s}') passed, $(grep -ho 'Skipped checks: [0-9]*' "$WORK/checkov.txt" | awk '{s += $3} END {print s}') skipped with their reason) in $(($(date +%s) - S0))s"

# ---- 5. podman kube play ------------------------------------------------------------------
DEV_PORT=$(free_port)
OPS_PORT=$(free_port)
PG_PORT=$(free_port)
EXP_PORT=$(free_port)
"$TPY" scripts/e2e/kube-play-input.py deploy/kubernetes --secrets "$WORK/secrets/secrets.yaml" \
    --publish "mosquitto:1883=$DEV_PORT" --publish "mosquitto:1884=$OPS_PORT" \
    --publish "postgres:5432=$PG_PORT" --publish "edge-exporter:9108=$EXP_PORT" \
    -o "$PLAY" >"$WORK/play-input.txt"
klog "podman kube play: $(cut -d: -f2- "$WORK/play-input.txt")"
# Left over by an interrupted run: the claims would hold an old broker's state.
podman_ volume rm -f data-mosquitto-0 data-postgres-0 >/dev/null 2>&1 || true
P0=$(date +%s.%N)
podman_ kube play "$PLAY" >"$WORK/play.log" 2>&1 || {
    cat "$WORK/play.log" >&2
    exit 1
}
metrics() { python3 -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())" "$1"; }
exporter_connected() { metrics "http://127.0.0.1:$EXP_PORT/metrics" | grep -q '^edge_fleet_exporter_broker_connected 1'; }
until_ok 120 "the exporter's /metrics with broker_connected 1" exporter_connected
EXPORTER_UP=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$P0")
klog "ok   exporter answers /metrics on 127.0.0.1:$EXP_PORT, connected to the broker, ${EXPORTER_UP}s after kube play began"
collector_ready() { # collector_ready POD: its /metrics says broker and database are up
    podman_ exec "$1-collector" python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9109/metrics', timeout=3).read().decode())" >"$WORK/$1.metrics" 2>/dev/null &&
        grep -q '^edge_collector_broker_connected 1' "$WORK/$1.metrics" &&
        grep -q '^edge_collector_database_up 1' "$WORK/$1.metrics"
}
for pod in edge-collector-pod-0 edge-collector-pod-1; do
    until_ok 120 "$pod connected to the broker and PostgreSQL" collector_ready "$pod"
done
COLLECTORS_UP=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$P0")
klog "ok   both collector replicas connected (broker and database), ${COLLECTORS_UP}s after kube play began"

# ---- the agent, natively, against that broker ---------------------------------------------
FILES=$WORK/secrets/files
HTTP_PORT=$(free_port)
cat >"$WORK/agent.toml" <<TOML
state_dir = "$WORK/agent-state"
[device]
id = "$DEVICE"
fleet = "$FLEET"
[http]
port = $HTTP_PORT
[models]
trusted_keys = ["$FILES/publisher.pub"]
[mqtt]
url = "mqtt://127.0.0.1:$DEV_PORT"
username = "$DEVICE"
password_file = "$FILES/$DEVICE.password"
[health]
interval_s = 5
TOML
.venv/bin/edge-agent run --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
AGENT_PID=$!
online() { .venv/bin/edge-agent status --config "$WORK/agent.toml" --json 2>/dev/null | grep -q '"connected": *true'; }
until_ok 60 "the agent connected to the broker in the pod" online || {
    tail -n 20 "$WORK/agent.log" >&2
    exit 1
}
klog "ok   agent $DEVICE connected to mosquitto (pod) on 127.0.0.1:$DEV_PORT"
export EDGE_BROKER=mqtt://127.0.0.1:$OPS_PORT EDGE_USERNAME=ops EDGE_PASSWORD_FILE=$FILES/ops.password
.venv/bin/edge-fleet publish agent/demo/iris --fleet "$FLEET" --signing-key "$FILES/publisher.key" >"$WORK/publish.log" 2>&1 || {
    cat "$WORK/publish.log" >&2
    exit 1
}
served() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "http://127.0.0.1:$HTTP_PORT/v2/models/iris/ready"; }
until_ok 120 "the published iris model served by the agent" served || {
    tail -n 20 "$WORK/agent.log" >&2
    exit 1
}
klog "ok   edge-fleet publish agent/demo/iris: delivered through the pod's broker and served"
for i in 1 2 3; do
    python3 -c "import json, sys, urllib.request; print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=json.dumps({'features': [[5.1, 3.5, 1.4, 0.2]], 'request_id': sys.argv[2]}).encode()), timeout=10).read().decode())" \
        "http://127.0.0.1:$HTTP_PORT/predict" "k8s-order-$i" >"$WORK/predict-$i.json"
done
grep -q '"prediction"' "$WORK/predict-3.json" || {
    klog "/predict answered $(cat "$WORK/predict-3.json")"
    exit 1
}
klog "ok   /predict answered: $(cut -c1-80 "$WORK/predict-3.json")"
PSQL=(env PGPASSWORD="$(cat "$FILES/postgres.password")" psql -h 127.0.0.1 -p "$PG_PORT" -U edge -d edge -tA)
stored() { [[ $("${PSQL[@]}" -c "select count(*) from results where device = '$DEVICE' and request_id like 'k8s-order-%'" 2>/dev/null) == 3 ]]; }
until_ok 120 "the 3 results in the pod's PostgreSQL" stored || {
    "${PSQL[@]}" -c "select device, seq, request_id from results" >&2 || true
    exit 1
}
klog "ok   psql: $("${PSQL[@]}" -c "select count(*) || ' results of $DEVICE, model ' || min(model) || ' ' || min(version) from results where device = '$DEVICE'") in PostgreSQL (pod postgres)"
drained() { .venv/bin/edge-agent status --config "$WORK/agent.toml" --json | python3 -c "import json, sys; s = json.load(sys.stdin); sys.exit(0 if s['buffer']['rows'] == 0 else 1)"; }
until_ok 60 "the agent's buffer emptied by the collectors' acks" drained
klog "ok   the agent's buffer is empty: the collector acknowledged what it committed"
device_metrics() { metrics "http://127.0.0.1:$EXP_PORT/metrics" | grep -q "^edge_fleet_device_online{.*device=\"$DEVICE\".*} 1"; }
until_ok 60 "edge_fleet_device_online for $DEVICE on the exporter" device_metrics
klog "ok   exporter: edge_fleet_device_online{device=\"$DEVICE\"} 1"
# The follower's readiness probe (podman 4.3 runs no probes): its account reads the
# desired state the agent was just given.
podman_ exec edge-rollout-pod-0-rollout edge-fleet list --json >"$WORK/rollout-list.json" || {
    klog "the rollout follower's readiness command failed"
    exit 1
}
grep -q '"iris"' "$WORK/rollout-list.json" || {
    klog "edge-fleet list in the follower's pod does not show iris: $(head -c 300 "$WORK/rollout-list.json")"
    exit 1
}
klog "ok   the follower's readiness command (edge-fleet list, its own account) sees iris in fleet $FLEET"
# The central image's own start-up, without the pods around it being created: a
# container restarted in its running pod, from start to answering.
elapsed() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }
podman_ stop -t 10 edge-exporter-exporter >/dev/null
R0=$(date +%s.%N)
podman_ start edge-exporter-exporter >/dev/null
until_ok 60 "the restarted exporter connected" exporter_connected
EXPORTER_START=$(elapsed "$R0")
podman_ stop -t 10 edge-collector-pod-0-collector >/dev/null
R0=$(date +%s.%N)
podman_ start edge-collector-pod-0-collector >/dev/null
until_ok 60 "the restarted collector connected" collector_ready edge-collector-pod-0
COLLECTOR_START=$(elapsed "$R0")
klog "ok   container start to answering: exporter ${EXPORTER_START}s (/metrics, broker connected), collector ${COLLECTOR_START}s (broker and PostgreSQL up)"
kill "$AGENT_PID"
wait "$AGENT_PID" || true
AGENT_PID=""

D0=$(date +%s)
podman_ kube down "$PLAY" >/dev/null
LEFT=$(podman_ pod ps -q | wc -l)
((LEFT == 0)) || {
    klog "podman kube down left $LEFT pods"
    exit 1
}
podman_ volume rm -f data-mosquitto-0 data-postgres-0 >/dev/null
klog "ok   podman kube down: every pod gone in $(($(date +%s) - D0))s"

# ---- 6. compose ----------------------------------------------------------------------------
if [[ ${K8S_E2E_SKIP_COMPOSE:-0} != 1 ]]; then
    TOOLS=$TOOLS WORK=$WORK CSTORE_ROOT=$CSTORE_ROOT CSTORE_RUNROOT=$CSTORE_RUNROOT scripts/e2e/compose-check.sh
fi

printf '\ncentral image %s MB (%s) | container start to answering: exporter %ss, collector %ss | kube play to exporter %ss, to both collectors %ss | build %ss | total %ss\n' \
    "$((CENTRAL_SIZE / 1000000))" "$CBASE_ARCH" "$EXPORTER_START" "$COLLECTOR_START" "$EXPORTER_UP" "$COLLECTORS_UP" \
    "$CENTRAL_BUILD_S" "$(($(date +%s) - T0))"
