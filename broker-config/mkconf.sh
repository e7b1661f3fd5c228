#!/usr/bin/env bash
# Render the edge-agent broker configuration into a folder mosquitto reads.
#
#   mkconf.sh [--conf-dir DIR] [--data-dir DIR] [--port N] [--bind ADDR]
#             [--operator-port N] [--operator-bind ADDR] [--operator-tls-port N]
#             [--tls-port N] [--tls-bind ADDR] [--require-certificate]
#             [--prefix edge] [--autosave-changes N] [--log-dest stderr|syslog|file PATH]
#
# Writes DIR/mosquitto.conf (from mosquitto.conf, plus tls.conf with --tls-port and
# operator-tls.conf with --operator-tls-port), DIR/acl (from acl, only if absent:
# mkcreds.sh appends accounts to it; an existing one only gains the header patterns it
# lacks) and empty DIR/passwd (devices) and DIR/passwd-operators.
# Run mosquitto with: mosquitto -c DIR/mosquitto.conf
# Started as root, mosquitto drops to user "mosquitto": files it reads are made
# root:mosquitto 0640 and the data folder mosquitto-owned.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

conf_dir=/etc/mosquitto/edge
data_dir=/var/lib/mosquitto/edge
port=1883
bind=127.0.0.1
tls_port=""
tls_bind=0.0.0.0
operator_port=1884
operator_bind=127.0.0.1
operator_tls_port=""
require_cert=false
prefix=edge
autosave=1
log_dest=syslog

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --conf-dir) conf_dir="$2"; shift 2 ;;
        --data-dir) data_dir="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --bind) bind="$2"; shift 2 ;;
        --tls-port) tls_port="$2"; shift 2 ;;
        --operator-port) operator_port="$2"; shift 2 ;;
        --operator-bind) operator_bind="$2"; shift 2 ;;
        --operator-tls-port) operator_tls_port="$2"; shift 2 ;;
        --tls-bind) tls_bind="$2"; shift 2 ;;
        --require-certificate) require_cert=true; shift ;;
        --prefix) prefix="$2"; shift 2 ;;
        --autosave-changes) autosave="$2"; shift 2 ;;
        --log-dest) log_dest="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "mkconf.sh: unknown option $1" >&2; usage ;;
    esac
done
[[ "$port" =~ ^[0-9]+$ ]] || { echo "mkconf.sh: --port: '$port' is not a port number" >&2; exit 2; }
[[ -z "$tls_port" || "$tls_port" =~ ^[0-9]+$ ]] || { echo "mkconf.sh: --tls-port: '$tls_port' is not a port number" >&2; exit 2; }
[[ "$operator_port" =~ ^[0-9]+$ ]] || { echo "mkconf.sh: --operator-port: '$operator_port' is not a port number" >&2; exit 2; }
[[ -z "$operator_tls_port" || "$operator_tls_port" =~ ^[0-9]+$ ]] || { echo "mkconf.sh: --operator-tls-port: '$operator_tls_port' is not a port number" >&2; exit 2; }
[[ -z "$operator_tls_port" || -n "$tls_port" ]] || { echo "mkconf.sh: --operator-tls-port needs --tls-port (the same certificate)" >&2; exit 2; }
[[ "$prefix" =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] || { echo "mkconf.sh: --prefix: '$prefix' is not a topic prefix like 'edge'" >&2; exit 2; }
[[ "$autosave" =~ ^[1-9][0-9]*$ ]] || { echo "mkconf.sh: --autosave-changes: '$autosave' is not a positive integer" >&2; exit 2; }

mkdir -p "$conf_dir" "$data_dir"
render() {
    sed -e "s|@CONF_DIR@|$conf_dir|g" -e "s|@DATA_DIR@|$data_dir|g" \
        -e "s|@PORT@|$port|g" -e "s|@BIND@|$bind|g" \
        -e "s|@TLS_PORT@|$tls_port|g" -e "s|@TLS_BIND@|$tls_bind|g" \
        -e "s|@OPERATOR_PORT@|$operator_port|g" -e "s|@OPERATOR_BIND@|$operator_bind|g" \
        -e "s|@OPERATOR_TLS_PORT@|$operator_tls_port|g" \
        -e "s|@REQUIRE_CERT@|$require_cert|g" -e "s|@PREFIX@|$prefix|g" \
        -e "s|@AUTOSAVE_CHANGES@|$autosave|g" -e "s|@LOG_DEST@|$log_dest|g" "$1"
}
{
    render "$here/mosquitto.conf"
    if [ -n "$tls_port" ]; then echo; render "$here/tls.conf"; fi
    if [ -n "$operator_tls_port" ]; then echo; render "$here/operator-tls.conf"; fi
} > "$conf_dir/mosquitto.conf"
if [ ! -f "$conf_dir/acl" ]; then
    render "$here/acl" > "$conf_dir/acl"
else
    # An ACL rendered by an older version keeps its accounts but gains the header
    # patterns added since (e.g. results/ack: without it no device hears its acks),
    # inserted after its last pattern line.
    missing="$(render "$here/acl" | grep '^pattern ' | grep -vxF -f <(grep '^pattern ' "$conf_dir/acl") || true)"
    if [ -n "$missing" ]; then
        tmp="$(mktemp "$conf_dir/acl.XXXXXX")"
        awk -v add="$missing" '
            { lines[NR] = $0; if ($0 ~ /^pattern /) last = NR }
            END { for (i = 1; i <= NR; i++) { print lines[i]; if (i == last) print add }
                  if (!last) print add }
        ' "$conf_dir/acl" > "$tmp"
        chmod --reference="$conf_dir/acl" "$tmp"
        chown --reference="$conf_dir/acl" "$tmp" 2>/dev/null || true
        mv "$tmp" "$conf_dir/acl"
    fi
fi
[ -f "$conf_dir/passwd" ] || : > "$conf_dir/passwd"
[ -f "$conf_dir/passwd-operators" ] || : > "$conf_dir/passwd-operators"

if [ "$(id -u)" -eq 0 ] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$conf_dir" "$conf_dir/mosquitto.conf" "$conf_dir/acl" "$conf_dir/passwd" \
        "$conf_dir/passwd-operators"
    chmod 0750 "$conf_dir"
    chmod 0640 "$conf_dir/mosquitto.conf" "$conf_dir/acl" "$conf_dir/passwd" \
        "$conf_dir/passwd-operators"
    chown mosquitto:mosquitto "$data_dir"
    chmod 0750 "$data_dir"
fi
echo "$conf_dir/mosquitto.conf"
