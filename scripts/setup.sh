#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian (bookworm) machine:
# the system packages (python3-venv, mosquitto), a virtualenv in .venv with the
# project installed editable with its converter and dev extras.
# `setup.sh --test` also installs what only the test suite uses: Prometheus (a real
# scrape of the fleet exporter) and systemd-analyze (the unit's security score).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || want_pkgs+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || want_pkgs+=(mosquitto)
command -v openssl >/dev/null 2>&1 || want_pkgs+=(openssl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || want_pkgs+=(python3-venv python3-pip)
if [ "${1:-}" = "--test" ]; then
    command -v prometheus >/dev/null 2>&1 || want_pkgs+=(prometheus)
    command -v systemd-analyze >/dev/null 2>&1 || want_pkgs+=(systemd)
fi
if [ ${#want_pkgs[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${want_pkgs[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want_pkgs[@]}" >/dev/null
fi
# The packaged broker and Prometheus are not needed as services: tests start their own.

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
