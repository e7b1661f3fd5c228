# PostgreSQL 15 from Debian bookworm: the reference database of deploy/kubernetes and
# deploy/compose.yaml, built locally (make k8s-e2e) because the e2e has no registry. Any
# PostgreSQL >= 13 serves the collector (docs/collector.md); on a real cluster a managed
# one (RDS, Cloud SQL, an operator such as CloudNativePG) replaces it: docs/kubernetes.md.
#
#   podman build --platform linux/amd64 --format docker -f deploy/images/postgres.Dockerfile -t edge-postgres:15 .
#
# The first start initialises PGDATA (POSTGRES_USER owns the database POSTGRES_DB, its
# password read from POSTGRES_PASSWORD_FILE); later starts find it and just run.
FROM debian:bookworm-slim

# A fixed uid for the manifests' runAsUser, made before the package makes its own; no
# cluster at install time (postgresql-common would create "main" under /var/lib).
# hadolint ignore=DL3008
RUN groupadd --gid 10003 postgres \
    && useradd --uid 10003 --gid 10003 --no-log-init --no-create-home \
        --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
    && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data

COPY deploy/images/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh

# POSTGRES_PASSWORD_FILE is where the password is mounted, not a password.
# hadolint ignore=DL3064
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data/pgdata \
    POSTGRES_USER=edge \
    POSTGRES_DB=edge \
    POSTGRES_PASSWORD_FILE=/run/secrets/postgres/password
VOLUME ["/var/lib/postgresql/data"]
USER 10003:10003
EXPOSE 5432
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]
# SIGINT is PostgreSQL's "fast shutdown": sessions end, everything is flushed.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
