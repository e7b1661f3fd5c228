#!/usr/bin/env bash
# Create (or renew) broker accounts: devices, operators, collectors and viewers.
#
#   mkcreds.sh [--conf-dir DIR] [--out DIR] device DEVICE_ID --fleet FLEET
#   mkcreds.sh [--conf-dir DIR] [--out DIR] operator NAME
#   mkcreds.sh [--conf-dir DIR] [--out DIR] collector NAME
#   mkcreds.sh [--conf-dir DIR] [--out DIR] viewer NAME      (reader: the same)
#   mkcreds.sh [--conf-dir DIR] remove NAME
#
# Adds the account with a fresh random password to DIR/passwd (devices; they log in on
# the device listeners) or DIR/passwd-operators (operators, collectors and viewers; the
# operator listeners), hashed by mosquitto_passwd, and its role's ACL block to DIR/acl,
# and writes the password to OUT/NAME.password (mode 0600) for the device's
# mqtt.password_file or edge-fleet --password-file. What each role may do is in
# docs/broker.md. Running it again for the same name renews the password and replaces
# the block (e.g. a new fleet). Many devices at once, with their agent configuration:
# edge-fleet enroll. Afterwards reload the broker: systemctl reload mosquitto.
#
# The accounts are written by fleet/accounts.py, the code behind `edge-fleet enroll`
# too (one implementation): it needs only python3's standard library, from this checkout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
case "${1:-}" in -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;; esac
root="$(dirname "$here")"
[ -f "$root/fleet/accounts.py" ] || { echo "mkcreds.sh: $root/fleet/accounts.py not found: run it from an edge-agent checkout" >&2; exit 1; }
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m fleet.accounts "$@"
