#!/usr/bin/env bash
# Create (or renew) broker accounts: devices, operators, collectors and readers.
#
#   mkcreds.sh [--conf-dir DIR] [--out DIR] device DEVICE_ID --fleet FLEET
#   mkcreds.sh [--conf-dir DIR] [--out DIR] operator NAME
#   mkcreds.sh [--conf-dir DIR] [--out DIR] collector NAME
#   mkcreds.sh [--conf-dir DIR] [--out DIR] reader NAME
#   mkcreds.sh [--conf-dir DIR] remove NAME
#
# Adds the account with a fresh random password to DIR/passwd (devices; they log in on
# the device listeners) or DIR/passwd-operators (operators, collectors and readers; the
# operator listeners), with mosquitto_passwd, and its ACL block to DIR/acl, and writes
# the password to OUT/NAME.password (mode 0600) for the device's mqtt.password_file or
# edge-fleet --password-file. A collector (edge-fleet collect) reads every device's
# results, health, events and status and writes result acks; a reader (the exporter,
# edge-fleet status) only reads status, health, events and desired state. Running it
# again for the same name renews the password and replaces the block (e.g. a new fleet).
# Afterwards reload the broker: systemctl reload mosquitto (or kill -HUP its pid).
set -euo pipefail

conf_dir=/etc/mosquitto/edge
out_dir=.
prefix=""
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --conf-dir) conf_dir="$2"; shift 2 ;;
        --out) out_dir="$2"; shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "mkcreds.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || usage
kind="$1"; name="$2"; shift 2
fleet=""
while [ $# -gt 0 ]; do
    case "$1" in
        --fleet) fleet="$2"; shift 2 ;;
        *) echo "mkcreds.sh: unknown argument $1" >&2; usage ;;
    esac
done

# Names become topic segments, folder names and ACL lines: no wildcards, slashes or
# spaces, and no leading dot (the rule of agent/wire/names.py).
valid='^[A-Za-z0-9_-][A-Za-z0-9_.-]*$'
[[ "$name" =~ $valid ]] || { echo "mkcreds.sh: name: '$name' is not a plain name (letters, digits, _ - and ., not starting with a dot)" >&2; exit 2; }
acl="$conf_dir/acl"
devices="$conf_dir/passwd"
operators="$conf_dir/passwd-operators"
[ -f "$operators" ] || : > "$operators"
# An account lives in one password file; its ACL block is found by name, so a device
# and an operator, collector or reader may not share one.
has() { grep -q "^$2:" "$1" 2>/dev/null; }
[ -f "$acl" ] || { echo "mkcreds.sh: $acl: no ACL file (run mkconf.sh first)" >&2; exit 1; }
if [ -z "$prefix" ]; then
    # The prefix the ACL was rendered with: taken from its first pattern line.
    prefix="$(sed -n 's|^pattern write \(.*\)/devices/%u/status$|\1|p' "$acl" | head -n1)"
    prefix="${prefix:-edge}"
fi

# Drop NAME's block (from "user NAME" to the next blank line) from the ACL.
remove_block() {
    local tmp
    tmp="$(mktemp "$acl.XXXXXX")"
    awk -v who="user $1" '
        $0 == who { skip = 1; next }
        skip && /^[[:space:]]*$/ { skip = 0; next }
        !skip { print }
    ' "$acl" > "$tmp"
    chmod --reference="$acl" "$tmp"
    chown --reference="$acl" "$tmp" 2>/dev/null || true
    mv "$tmp" "$acl"
}

case "$kind" in
    device)
        [[ "$fleet" =~ $valid ]] || { echo "mkcreds.sh: --fleet: '$fleet' is not a plain name" >&2; exit 2; }
        has "$operators" "$name" && { echo "mkcreds.sh: '$name' is an operator-listener account already" >&2; exit 1; }
        passwd="$devices"
        block="user $name
topic read $prefix/fleets/$fleet/models/+/desired
topic read $prefix/artifacts/#" ;;
    operator)
        has "$devices" "$name" && { echo "mkcreds.sh: '$name' is a device account already" >&2; exit 1; }
        passwd="$operators"
        block="user $name
topic readwrite #" ;;
    # The header's device patterns (%u) apply to every account, so without its deny line
    # a collector or reader named c1 could publish edge/devices/c1/status and pass for a
    # device; a deny line wins over every grant. Shared subscriptions need no line of
    # their own: mosquitto checks a $share/GROUP/... delivery against the real topic.
    collector)
        has "$devices" "$name" && { echo "mkcreds.sh: '$name' is a device account already" >&2; exit 1; }
        passwd="$operators"
        block="user $name
topic deny $prefix/devices/$name/#
topic read $prefix/devices/+/results
topic read $prefix/devices/+/health
topic read $prefix/devices/+/events
topic read $prefix/devices/+/status
topic write $prefix/devices/+/results/ack" ;;
    reader)
        has "$devices" "$name" && { echo "mkcreds.sh: '$name' is a device account already" >&2; exit 1; }
        passwd="$operators"
        block="user $name
topic deny $prefix/devices/$name/#
topic read $prefix/devices/+/status
topic read $prefix/devices/+/health
topic read $prefix/devices/+/events
topic read $prefix/fleets/+/models/+/desired
topic read $prefix/fleets/+/models/+/history
topic read $prefix/devices/+/models/+/desired
topic read $prefix/devices/+/models/+/history" ;;
    remove)
        remove_block "$name"
        for file in "$devices" "$operators"; do
            if has "$file" "$name"; then mosquitto_passwd -D "$file" "$name" >/dev/null; fi
        done
        echo "removed $name"
        exit 0 ;;
    *) echo "mkcreds.sh: '$kind': expected device, operator, collector, reader or remove" >&2; usage ;;
esac

mkdir -p "$out_dir"
password="$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | cut -c1-24)"
mosquitto_passwd -b "$passwd" "$name" "$password"
remove_block "$name"
printf '\n%s\n\n' "$block" >> "$acl"
# Collapse runs of blank lines left by replacements.
tmp="$(mktemp "$acl.XXXXXX")"
cat -s "$acl" > "$tmp"
chmod --reference="$acl" "$tmp"; chown --reference="$acl" "$tmp" 2>/dev/null || true
mv "$tmp" "$acl"
( umask 077; printf '%s\n' "$password" > "$out_dir/$name.password" )
echo "$out_dir/$name.password"
