# Shared by the scripts that show a user's steps and run them (scripts/tour.sh,
# scripts/fleet-walk.sh): a work folder, background processes stopped at the end, each
# step printed as the user would type it, and waits that fail naming what never came.
#
#   . scripts/e2e/walk-steps.sh NAME [WORKDIR]
#
# Sets W (WORKDIR, kept; or a fresh /tmp/edge-NAME.XXXXXX, removed at the end unless
# KEEP is set) and pids (append a background process's pid to have it stopped).
# shellcheck shell=bash
WALK_NAME="$1"
WALK_GIVEN="${2:-}"
if [ -n "$WALK_GIVEN" ]; then W="$WALK_GIVEN"; mkdir -p "$W"; else W="$(mktemp -d "/tmp/edge-$WALK_NAME.XXXXXX")"; fi
W="$(cd "$W" && pwd)"
pids=()
walk_cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "$WALK_GIVEN" ] || [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap walk_cleanup EXIT
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }
until_ok() {  # until_ok SECONDS WHAT COMMAND...: retry a check, fail naming WHAT
    local deadline=$((SECONDS + $1)) what="$2"; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then echo "$WALK_NAME: $what: not within the time" >&2; exit 1; fi
        sleep 0.5
    done
}
