#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian (bookworm) machine:
# the system packages, a virtualenv in .venv with the project installed editable with
# its converter and dev extras.
#   mosquitto (mosquitto, mosquitto_passwd): the broker the agent and the tests talk to;
#   openssl: broker-config/mkca.sh (TLS); curl: the line `edge-agent demo` prints;
#   python3-venv: the virtualenv.
# `setup.sh --test` also installs what only the test suite uses: Prometheus (a real
# scrape of the fleet exporter), systemd-analyze (the unit's security score),
# PostgreSQL (the collector's database; tests/fixtures/postgres.py runs its own cluster),
# nginx (an HTTP origin for artifacts; tests/fixtures/nginx.py runs its own) and
# nats-server (a clustered MQTT broker; tests/fixtures/nats.py runs its own 3 nodes).
# A tool still missing after apt-get stops the set-up with its name
# (scripts/e2e/need.sh); scripts/e2e/fresh-machine.sh proves the list on a bare
# debootstrap. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/e2e/need.sh
. scripts/e2e/need.sh
NEED_LOG_PREFIX=setup

tools=(python3 python3 sha256sum coreutils mosquitto mosquitto mosquitto_passwd mosquitto
    openssl openssl curl curl)
if [ "${1:-}" = "--test" ]; then
    tools+=(prometheus prometheus systemd-analyze systemd nginx nginx nats-server nats-server)
fi
# The venv module and its ensurepip are a separate Debian package; installed together
# with the tools, in one apt-get run.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || NEED_ALSO=(python3-venv)
# Debian keeps PostgreSQL's initdb and pg_ctl off PATH, in /usr/lib/postgresql/VERSION/bin,
# so `need` cannot test for them by name: the package rides along when that folder is missing.
pg_bin() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
if [ "${1:-}" = "--test" ] && ! pg_bin; then
    NEED_ALSO+=(postgresql)
fi
need "${tools[@]}"
if [ "${1:-}" = "--test" ] && ! pg_bin; then
    echo "setup: no /usr/lib/postgresql/*/bin/initdb even after installing postgresql" >&2
    exit 1
fi
python3 -c 'import ensurepip, venv' || {
    echo "setup: python3 has no venv/ensurepip even after installing python3-venv" >&2
    exit 1
}
# The packaged broker, Prometheus, PostgreSQL cluster, nginx and NATS server are not
# needed as services: tests start their own.

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
