#!/usr/bin/env bash
# The rule of every script here: each tool it calls is installed by the script itself
# (CI machines and new laptops start bare), and a tool that is still missing stops the
# script with its name, instead of failing later as an empty answer.
#
#   . scripts/e2e/need.sh
#   need mosquitto mosquitto mosquitto_sub mosquitto-clients   # TOOL PACKAGE pairs
#   need_pkgs python3-venv                                      # packages, no tool to test
#   NEED_ALSO=(python3-venv); need ...   # installed together with the next need's
#
# need: every TOOL not found (on PATH, /usr/sbin or /sbin) gets its Debian PACKAGE,
# all of them in one `apt-get update` + `apt-get install`; afterwards every TOOL must be
# there, or it fails naming the TOOL and the PACKAGE. /usr/sbin and /sbin are added to
# PATH when missing (mosquitto lives in /usr/sbin, and a user's PATH may lack it).
# Uses sudo when not root. Quiet when nothing is missing.
# shellcheck disable=SC2034  # NEED_LOG_PREFIX is for the caller to set

case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH=$PATH:/usr/sbin ;; esac
case ":$PATH:" in *:/sbin:*) ;; *) PATH=$PATH:/sbin ;; esac
export PATH

NEED_LOG_PREFIX=${NEED_LOG_PREFIX:-need}
NEED_ALSO=()

need_log() { printf '%s: %s\n' "$NEED_LOG_PREFIX" "$*" >&2; }

# Install Debian packages (apt-get update first), as root or through sudo.
need_pkgs() {
    (($#)) || return 0
    local sudo=()
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || {
            need_log "not root and no sudo: cannot apt-get install $*"
            return 1
        }
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || {
        need_log "no apt-get on this machine: install $* by hand (Debian package names)"
        return 1
    }
    need_log "installing $*"
    "${sudo[@]}" apt-get update -q >/dev/null || {
        need_log "apt-get update failed (needed for: $*)"
        return 1
    }
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null || {
        need_log "apt-get install $* failed"
        return 1
    }
}

need() {
    (($# % 2 == 0)) || {
        need_log "need: expected TOOL PACKAGE pairs, got: $*"
        return 2
    }
    local args=("$@") pkgs=("${NEED_ALSO[@]}") i
    NEED_ALSO=()
    for ((i = 0; i < ${#args[@]}; i += 2)); do
        command -v "${args[i]}" >/dev/null || pkgs+=("${args[i + 1]}")
    done
    ((${#pkgs[@]})) || return 0
    # One install for all of them, each package once.
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    need_pkgs "${pkgs[@]}"
    hash -r
    local missing=0
    for ((i = 0; i < ${#args[@]}; i += 2)); do
        command -v "${args[i]}" >/dev/null || {
            need_log "${args[i]} is still missing after installing the Debian package ${args[i + 1]}"
            missing=1
        }
    done
    return "$missing"
}
