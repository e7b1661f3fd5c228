#!/usr/bin/env bash
# deploy/compose.yaml, checked by make k8s-e2e (scripts/k8s-e2e.sh calls this after the
# kube play run, with the images built): first against the compose specification's JSON
# schema (scripts/e2e/compose-spec.json, vendored: offline), then started for real with
# podman-compose on podman 4.3: the exporter answers /metrics connected to the broker,
# the collector reaches the broker and PostgreSQL (through its libpq password file), and
# `podman-compose down` removes every container.
#
# Env from the caller: TOOLS (the tools venv), WORK (a scratch folder), CSTORE_ROOT,
# CSTORE_RUNROOT (the container storage) and CONTAINERS_CONF.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${TOOLS:?}" "${WORK:?}" "${CSTORE_ROOT:?}" "${CSTORE_RUNROOT:?}" "${CONTAINERS_CONF:?}"
clog() { printf '[k8s-e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

"$TOOLS/bin/python" - deploy/compose.yaml scripts/e2e/compose-spec.json <<'PY'
import json, sys
import jsonschema, yaml
doc = yaml.safe_load(open(sys.argv[1]))
errors = sorted(jsonschema.Draft7Validator(json.load(open(sys.argv[2]))).iter_errors(doc), key=str)
for e in errors:
    print(f"{sys.argv[1]}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
clog "ok   deploy/compose.yaml validates against the compose specification's schema"

# podman-compose calls plain `podman`: the storage goes through storage.conf.
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
printf '[storage]\ndriver = "vfs"\ngraphroot = "%s"\nrunroot = "%s"\n' "$CSTORE_ROOT" "$CSTORE_RUNROOT" \
    >"$CONTAINERS_STORAGE_CONF"
C=$WORK/compose
mkdir -p "$C/deploy"
cp deploy/compose.yaml "$C/deploy/"
deploy/kubernetes/mksecrets.sh --out "$C/deploy/kubernetes/secrets" --for-compose >/dev/null
port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
export EDGE_DEVICE_BIND=127.0.0.1 EDGE_DEVICE_PORT=$(port) EDGE_OPERATOR_PORT=$(port)
export EDGE_POSTGRES_PORT=$(port) EDGE_EXPORTER_PORT=$(port)
COMPOSE=("$TOOLS/bin/podman-compose" -p "edge-e2e-$$" -f "$C/deploy/compose.yaml")
down() {
    "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true
}
trap down EXIT
U0=$(date +%s.%N)
"${COMPOSE[@]}" up -d >"$WORK/compose-up.log" 2>&1 || {
    tail -n 30 "$WORK/compose-up.log" >&2
    clog "podman-compose up failed (above)"
    exit 1
}
connected() {
    python3 -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())" \
        "http://127.0.0.1:$EDGE_EXPORTER_PORT/metrics" 2>/dev/null | grep -q '^edge_fleet_exporter_broker_connected 1'
}
t=$(date +%s)
until connected; do
    if (($(date +%s) - t > 120)); then
        "${COMPOSE[@]}" logs >&2 2>&1 || true
        clog "the compose exporter did not answer connected within 120 s"
        exit 1
    fi
    sleep 0.5
done
clog "ok   podman-compose up: exporter on 127.0.0.1:$EDGE_EXPORTER_PORT connected after $(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$U0")s"
collector=$("${COMPOSE[@]}" ps --format '{{.Names}}' 2>/dev/null | grep collector | head -n1)
ready() {
    podman exec "$collector" python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9109/metrics', timeout=3).read().decode())" 2>/dev/null |
        grep -q '^edge_collector_database_up 1'
}
t=$(date +%s)
until ready; do
    if (($(date +%s) - t > 120)); then
        podman logs "$collector" 2>&1 | tail -n 20 >&2
        clog "the compose collector did not reach PostgreSQL within 120 s"
        exit 1
    fi
    sleep 0.5
done
clog "ok   compose collector $collector: broker and PostgreSQL (libpq password file) up"
"${COMPOSE[@]}" down -v >/dev/null 2>&1
left=$(podman ps -a --format '{{.Names}}' | grep -c "edge-e2e-$$" || true)
((left == 0)) || {
    clog "podman-compose down left $left containers"
    exit 1
}
trap - EXIT
clog "ok   podman-compose down: every container gone"
