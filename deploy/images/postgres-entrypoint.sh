#!/bin/bash
# First start: initdb into PGDATA with POSTGRES_USER as the superuser (password from
# POSTGRES_PASSWORD_FILE, scram-sha-256 over TCP from anywhere the network policy lets
# in), then the database POSTGRES_DB. Every start: postgres in the foreground, its socket
# in /tmp (the root file system is read-only), logs on stderr. Extra arguments are
# passed to postgres (-c name=value).
#
# SIGTERM (what a kubelet, `podman kube down` or `docker stop` without the image's
# STOPSIGNAL sends) becomes SIGINT, PostgreSQL's fast shutdown: sessions end and
# everything is flushed at once. On SIGTERM itself ("smart" shutdown) it would wait for
# the collectors and the exporter to disconnect, which they never do by themselves.
set -euo pipefail
: "${PGDATA:?}" "${POSTGRES_USER:?}" "${POSTGRES_DB:?}" "${POSTGRES_PASSWORD_FILE:?}"
if [[ ! -s $PGDATA/PG_VERSION ]]; then
    [[ -s $POSTGRES_PASSWORD_FILE ]] || {
        echo "postgres-entrypoint: POSTGRES_PASSWORD_FILE=$POSTGRES_PASSWORD_FILE is missing or empty" >&2
        exit 1
    }
    echo "postgres-entrypoint: initialising $PGDATA (superuser $POSTGRES_USER, database $POSTGRES_DB)" >&2
    initdb --pgdata "$PGDATA" --username "$POSTGRES_USER" --pwfile "$POSTGRES_PASSWORD_FILE" \
        --encoding UTF8 --locale C.UTF-8 --auth-local trust --auth-host scram-sha-256 >/dev/null
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\"" |
        postgres --single -D "$PGDATA" -c unix_socket_directories=/tmp postgres >/dev/null
fi
postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@" &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null' TERM INT
rc=0
wait "$pid" || rc=$?
# A signal ends the first wait early; the second one waits for postgres itself.
if kill -0 "$pid" 2>/dev/null; then
    rc=0
    wait "$pid" || rc=$?
fi
exit "$rc"
