# mosquitto 2.0 from Debian bookworm, for the central broker of deploy/kubernetes and
# deploy/compose.yaml. Built locally (make k8s-e2e) because the e2e has no registry; on a
# cluster with one, push this image, or use eclipse-mosquitto:2 (the configuration from
# broker-config/ works unchanged: docs/kubernetes.md).
#
#   podman build --platform linux/amd64 --format docker -f deploy/images/mosquitto.Dockerfile -t edge-mosquitto:2.0.11 .
#
# The configuration (mosquitto.conf, acl, passwd, passwd-operators) is not in the image:
# deploy/kubernetes/mksecrets.sh renders it with broker-config/mkconf.sh and mkcreds.sh
# into a Secret mounted at /etc/mosquitto/edge. Retained state: /var/lib/mosquitto/edge.
FROM debian:bookworm-slim

# The mosquitto user first, with a fixed uid, so the package takes it instead of making a
# system user with whatever uid is free (runAsUser in the manifests names 10002).
# hadolint ignore=DL3008
RUN groupadd --gid 10002 mosquitto \
    && useradd --uid 10002 --gid 10002 --no-log-init --no-create-home \
        --home-dir /var/lib/mosquitto --shell /usr/sbin/nologin mosquitto \
    && apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
    && install -d -o mosquitto -g mosquitto -m 0750 /var/lib/mosquitto/edge \
    && install -d -m 0755 /etc/mosquitto/edge

VOLUME ["/var/lib/mosquitto/edge"]
USER 10002:10002
EXPOSE 1883 1884 8883 8884
# No client in the image: a TCP connect to the device listener is the liveness check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/1883"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/sbin/mosquitto"]
CMD ["-c", "/etc/mosquitto/edge/mosquitto.conf"]
