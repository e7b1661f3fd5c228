#!/usr/bin/env bash
# Render the edge-agent broker configuration into a folder mosquitto reads.
#
#   mkconf.sh [--conf-dir DIR] [--data-dir DIR] [--port N] [--bind ADDR]
#             [--operator-port N] [--operator-bind ADDR] [--operator-tls-port N]
#             [--tls-port N] [--tls-bind ADDR] [--require-certificate]
#             [--prefix edge] [--autosave-interval SECONDS | --autosave-changes N]
#             [--log-dest stderr|syslog|file PATH]
#             [--snippet FILE [--main-conf /etc/mosquitto/mosquitto.conf]]
#
# Writes DIR/mosquitto.conf (from mosquitto.conf, plus tls.conf with --tls-port and
# operator-tls.conf with --operator-tls-port), DIR/acl (from acl, only if absent:
# mkcreds.sh appends accounts to it; an existing one only gains the header patterns it
# lacks) and empty DIR/passwd (devices) and DIR/passwd-operators.
# Run mosquitto with: mosquitto -c DIR/mosquitto.conf
# --snippet FILE: for a broker whose main file (Debian's /etc/mosquitto/mosquitto.conf)
# reads FILE's folder with include_dir: FILE gets the configuration instead of
# DIR/mosquitto.conf, without the settings the main file sets already (mosquitto
# refuses a second persistence_location, persistence_file, pid_file or
# log_timestamp_format; a second log_dest would log everything twice).
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
autosave_interval=30
autosave_changes=""
log_dest=syslog
snippet=""
main_conf=/etc/mosquitto/mosquitto.conf

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
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
        --autosave-interval) autosave_interval="$2"; shift 2 ;;
        --autosave-changes) autosave_changes="$2"; shift 2 ;;
        --log-dest) log_dest="$2"; shift 2 ;;
        --snippet) snippet="$2"; shift 2 ;;
        --main-conf) main_conf="$2"; shift 2 ;;
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
[[ "$autosave_interval" =~ ^[1-9][0-9]*$ ]] || { echo "mkconf.sh: --autosave-interval: '$autosave_interval' is not a positive number of seconds" >&2; exit 2; }
[[ -z "$autosave_changes" || "$autosave_changes" =~ ^[1-9][0-9]*$ ]] || { echo "mkconf.sh: --autosave-changes: '$autosave_changes' is not a positive integer" >&2; exit 2; }
# Time or count (docs/broker.md, Persistence): mosquitto has one autosave_interval,
# seconds by default, a number of changes with autosave_on_changes.
if [ -n "$autosave_changes" ]; then
    autosave_on_changes=true; autosave="$autosave_changes"
else
    autosave_on_changes=false; autosave="$autosave_interval"
fi

# The once-only settings the main file sets already, which the snippet must leave out.
drop=""
if [ -n "$snippet" ]; then
    [[ "$snippet" == *.conf ]] || { echo "mkconf.sh: --snippet: '$snippet' must end in .conf (include_dir reads only *.conf)" >&2; exit 2; }
    [ -f "$main_conf" ] || { echo "mkconf.sh: --main-conf: $main_conf: no such file" >&2; exit 2; }
    snippet_dir="$(cd "$(dirname "$snippet")" 2>/dev/null && pwd)" || { echo "mkconf.sh: --snippet: $(dirname "$snippet"): no such folder" >&2; exit 2; }
    included="$(sed -n 's/^[[:space:]]*include_dir[[:space:]]\{1,\}\(.*[^[:space:]/]\)[[:space:]/]*$/\1/p' "$main_conf")"
    grep -qxF "$snippet_dir" <<< "$included" || { echo "mkconf.sh: --snippet: $main_conf has no 'include_dir $snippet_dir': mosquitto would not read $snippet" >&2; exit 2; }
    drop="$(grep -oE '^[[:space:]]*(persistence_location|persistence_file|pid_file|log_timestamp_format|log_dest)[[:space:]]' "$main_conf" | awk '{ print $1 }' | sort -u | tr '\n' ' ')"
fi

mkdir -p "$conf_dir"
case " $drop " in *" persistence_location "*) ;; *) mkdir -p "$data_dir" ;; esac
render() {
    sed -e "s|@CONF_DIR@|$conf_dir|g" -e "s|@DATA_DIR@|$data_dir|g" \
        -e "s|@PORT@|$port|g" -e "s|@BIND@|$bind|g" \
        -e "s|@TLS_PORT@|$tls_port|g" -e "s|@TLS_BIND@|$tls_bind|g" \
        -e "s|@OPERATOR_PORT@|$operator_port|g" -e "s|@OPERATOR_BIND@|$operator_bind|g" \
        -e "s|@OPERATOR_TLS_PORT@|$operator_tls_port|g" \
        -e "s|@REQUIRE_CERT@|$require_cert|g" -e "s|@PREFIX@|$prefix|g" \
        -e "s|@AUTOSAVE_ON_CHANGES@|$autosave_on_changes|g" -e "s|@AUTOSAVE@|$autosave|g" \
        -e "s|@LOG_DEST@|$log_dest|g" "$1"
}
# Settings before the first listener that the main file sets: commented out, saying so.
without_main() {
    awk -v drop=" $drop " -v main="$main_conf" '
        /^listener / { listeners = 1 }
        !listeners && $1 != "" && index(drop, " " $1 " ") { print "# " $0 "    (set by " main ")"; next }
        { print }'
}
conf_file="${snippet:-$conf_dir/mosquitto.conf}"
{
    if [ -n "$snippet" ]; then
        echo "# Read by $main_conf (include_dir); rendered by broker-config/mkconf.sh --snippet."
    fi
    render "$here/mosquitto.conf" | without_main
    if [ -n "$tls_port" ]; then echo; render "$here/tls.conf"; fi
    if [ -n "$operator_tls_port" ]; then echo; render "$here/operator-tls.conf"; fi
} > "$conf_file.tmp"
mv "$conf_file.tmp" "$conf_file"
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

# mosquitto re-reads its files as user mosquitto on a reload (SIGHUP).
if [ "$(id -u)" -eq 0 ] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$conf_dir" "$conf_file" "$conf_dir/acl" "$conf_dir/passwd" \
        "$conf_dir/passwd-operators"
    chmod 0750 "$conf_dir"
    chmod 0640 "$conf_file" "$conf_dir/acl" "$conf_dir/passwd" "$conf_dir/passwd-operators"
    if [ -d "$data_dir" ]; then
        chown mosquitto:mosquitto "$data_dir"
        chmod 0750 "$data_dir"
    fi
fi
echo "$conf_file"
