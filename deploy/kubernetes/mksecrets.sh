#!/usr/bin/env bash
# Make the Secrets of deploy/kubernetes (and deploy/compose.yaml's files) with the
# project's own broker-config scripts: the broker's configuration and accounts rendered
# by broker-config/mkconf.sh and mkcreds.sh, fresh random passwords, the publisher's key.
#
#   deploy/kubernetes/mksecrets.sh [--out DIR] [--signing-key PUBLISHER_KEY]
#                                  [--device ID --fleet FLEET ...] [--tls-san DNS ...]
#                                  [--for-compose]
#
# Writes DIR/secrets.yaml (default deploy/kubernetes/secrets; git ignores it), the
# Secrets kustomization.yaml lists, and keeps the plain files beside it in DIR/files/
# (mode 0600: the operator's password for edge-fleet on a workstation, each device's
# password for its agent, the broker's folder for compose):
#
#   mosquitto-config      mosquitto.conf, acl, passwd, passwd-operators (+ TLS files)
#   edge-collector-mqtt   password of the collector account "collector"
#   edge-exporter-mqtt    password of the viewer account "exporter"
#   edge-rollout-mqtt     password of the operator account "rollout" (the follower)
#   edge-signing-key      publisher.key (edge-model keygen makes one when none is given)
#   postgres-credentials  password of the database's owner "edge"
#   edge-agent-devices    one key per --device: its broker password (the DaemonSet)
#
# plus the operator account "ops" (files/ops.password) for people. --tls-san: also a CA
# and a server certificate for these names (broker-config/mkca.sh), and the TLS
# listeners 8883 (devices) and 8884 (operators). --for-compose (as root): each file of
# files/ that deploy/compose.yaml mounts is given to the image user that reads it
# (broker/ 10002, postgres.password 10003, the fleet tools' files 10001), and libpq
# password files pgpass-collector and pgpass-exporter are written. Running it again
# renews everything: apply the new Secrets and restart mosquitto (docs/kubernetes.md).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$here/secrets"
signing_key=""
devices=()
fleets=()
sans=()
for_compose=0
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --signing-key) signing_key="$2"; shift 2 ;;
        --device) devices+=("$2"); shift 2 ;;
        --fleet)
            (( ${#devices[@]} > ${#fleets[@]} )) || { echo "mksecrets.sh: --fleet $2: give it after its --device" >&2; exit 2; }
            fleets+=("$2"); shift 2 ;;
        --tls-san) sans+=("$2"); shift 2 ;;
        --for-compose) for_compose=1; shift ;;
        -h|--help) usage ;;
        *) echo "mksecrets.sh: unknown option $1" >&2; usage ;;
    esac
done
(( ${#devices[@]} == ${#fleets[@]} )) || { echo "mksecrets.sh: --device ${devices[-1]}: needs its --fleet FLEET" >&2; exit 2; }
[ -z "$signing_key" ] || [ -f "$signing_key" ] || { echo "mksecrets.sh: --signing-key: $signing_key: no such file" >&2; exit 2; }
command -v mosquitto_passwd >/dev/null || { echo "mksecrets.sh: mosquitto_passwd is missing (Debian: apt-get install mosquitto)" >&2; exit 1; }

umask 077
mkdir -p "$out/files"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
conf="$work/conf"
# Rendered for the paths inside the container; mkconf.sh writes them into the files.
tls=()
if (( ${#sans[@]} )); then tls=(--tls-port 8883 --operator-tls-port 8884); fi
"$root/broker-config/mkconf.sh" --conf-dir "$conf" --data-dir "$work/data" \
    --port 1883 --bind 0.0.0.0 --operator-port 1884 --operator-bind 0.0.0.0 \
    "${tls[@]}" --log-dest stderr >/dev/null
account() { "$root/broker-config/mkcreds.sh" --conf-dir "$conf" --out "$out/files" "$@" >/dev/null; }
account collector collector
account viewer exporter
account operator rollout
account operator ops
for i in "${!devices[@]}"; do account device "${devices[$i]}" --fleet "${fleets[$i]}"; done
if (( ${#sans[@]} )); then
    san_args=()
    for s in "${sans[@]}"; do san_args+=(--san "DNS:$s"); done
    "$root/broker-config/mkca.sh" --dir "$work/ca" server "${san_args[@]}" >/dev/null
    cp "$work/ca/ca.crt" "$work/ca/server.crt" "$work/ca/server.key" "$conf/"
    cp "$work/ca/ca.crt" "$out/files/ca.crt"
fi
sed -i -e "s|$conf|/etc/mosquitto/edge|g" -e "s|$work/data|/var/lib/mosquitto/edge|g" "$conf/mosquitto.conf"
if [ -z "$signing_key" ]; then
    if [ ! -f "$out/files/publisher.key" ]; then
        "$root/.venv/bin/edge-model" keygen -o "$out/files" >/dev/null 2>&1 ||
            edge-model keygen -o "$out/files" >/dev/null ||
            { echo "mksecrets.sh: no --signing-key and no edge-model to make one" >&2; exit 1; }
    fi
else
    cp "$signing_key" "$out/files/publisher.key"
fi
[ -f "$out/files/postgres.password" ] ||
    python3 -c "import secrets; print(secrets.token_urlsafe(24), end='')" >"$out/files/postgres.password"
rm -rf "$out/files/broker"
cp -r "$conf" "$out/files/broker"

# One Secret per consumer; data base64-encoded, so any byte survives.
python3 - "$out" "$conf" "${devices[@]}" <<'PY'
import base64, pathlib, sys
out, conf = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = out / "files"
def secret(name, entries):
    lines = ["---", "apiVersion: v1", "kind: Secret", "metadata:", f"  name: {name}",
             "  labels:", "    app.kubernetes.io/part-of: edge-agent", "type: Opaque", "data:"]
    for key, path in entries:
        # Quoted: an empty file (passwd before the first device) must stay "", not null.
        lines.append(f'  {key}: "{base64.b64encode(pathlib.Path(path).read_bytes()).decode()}"')
    return "\n".join(lines)
docs = [
    "# Made by deploy/kubernetes/mksecrets.sh; holds passwords: never commit it.",
    secret("mosquitto-config", [(p.name, p) for p in sorted(conf.iterdir()) if p.is_file()]),
    secret("edge-collector-mqtt", [("password", files / "collector.password")]),
    secret("edge-exporter-mqtt", [("password", files / "exporter.password")]),
    secret("edge-rollout-mqtt", [("password", files / "rollout.password")]),
    secret("edge-signing-key", [("publisher.key", files / "publisher.key")]),
    secret("postgres-credentials", [("password", files / "postgres.password")]),
]
devices = sys.argv[3:]
if devices:
    docs.append(secret("edge-agent-devices", [(d, files / f"{d}.password") for d in devices]))
(out / "secrets.yaml").write_text("\n".join(docs) + "\n")
PY
if (( for_compose )); then
    [ "$(id -u)" -eq 0 ] || { echo "mksecrets.sh: --for-compose: needs root, to give the files to the images' users" >&2; exit 1; }
    pw="$(cat "$out/files/postgres.password")"
    for who in collector exporter; do
        printf 'postgres:5432:edge:edge:%s\n' "$pw" >"$out/files/pgpass-$who"
        chown 10001:10001 "$out/files/pgpass-$who"
    done
    chown -R 10002:10002 "$out/files/broker"
    chown 10003:10003 "$out/files/postgres.password"
    chown 10001:10001 "$out/files/collector.password" "$out/files/exporter.password" \
        "$out/files/rollout.password" "$out/files/publisher.key"
    # The folder itself: every container user must get through it to its own files.
    chmod 0755 "$out" "$out/files"
fi
echo "$out/secrets.yaml"
