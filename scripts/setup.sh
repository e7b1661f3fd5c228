#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian (bookworm) machine:
# the system packages (python3-venv, mosquitto for the tests), a virtualenv in .venv
# with the project installed editable with its converter and dev extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || want_pkgs+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || want_pkgs+=(mosquitto)
command -v openssl >/dev/null 2>&1 || want_pkgs+=(openssl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || want_pkgs+=(python3-venv python3-pip)
if [ ${#want_pkgs[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${want_pkgs[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want_pkgs[@]}" >/dev/null
fi
# The packaged broker is not needed as a service: tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    :
fi

EXTRAS="${EDGE_EXTRAS:-dev}"
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
