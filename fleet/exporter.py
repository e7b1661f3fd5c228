"""``edge-fleet exporter``: the whole fleet's status and health as Prometheus metrics.

A custom collector renders the latest ``FleetState`` at every scrape, so a device that
disappears from the state disappears from the metrics (no stale label sets linger).

Several exporters can split a large fleet with ``--share-group``: health is then a
MQTT 5 shared subscription (``$share/GROUP/edge/devices/+/health``) and the broker
gives each health message to ONE exporter of the group. Status stays an ordinary
subscription in every exporter: a shared one would give each status change to one
exporter only, and by MQTT 5 it receives no retained messages (mosquitto 2.0 sends
them anyway, docs/broker.md), so each exporter still knows every device's online
state. Counters the exporter sums from health windows (inferences, errors) are
then partitioned between exporters and add up with ``sum``; everything else is the
latest value an exporter saw and aggregates with ``max`` (docs/fleet.md).

Rollout plans (``{prefix}/fleets/+/models/+/rollout``, retained) are an ordinary
subscription too and become the ``edge_fleet_rollout_*`` series
(``fleet/exporter_rollouts.py``). ``--db URL`` adds what the collector stored, read
from its database (``fleet/exporter_db.py``). The alert rules over all of these are
in ``prometheus/edge-alerts.yml``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
from agent.wire.errors import EdgeError, UsageError
from agent.wire.payloads import DROP_REASONS
from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from fleet.connection import add_broker_arguments, broker_options, connect, disconnect
from fleet.exporter_db import CollectorFigures
from fleet.exporter_quality import quality_metrics
from fleet.exporter_rollouts import RolloutPlans
from fleet.state import DeviceState, FleetState

log = logging.getLogger(__name__)

DEV = ["device", "fleet"]
MODEL = [*DEV, "model", "version"]
# Every device with health gets a series for each drop reason (the wire's list), 0
# included, so increase() and the dashboard see a drop the first time one happens; an
# agent that sends `"dropped": {}` (before 0.2) has dropped nothing.
# (name, help, path in the health payload) of the plain per-device gauges
_HEALTH_GAUGES: list[tuple[str, str, tuple[str, ...]]] = [
    ("edge_fleet_device_uptime_seconds", "Agent uptime.", ("uptime_s",)),
    ("edge_fleet_device_cpu_percent", "Device CPU use, percent of all cores.", ("cpu_percent",)),
    ("edge_fleet_agent_cpu_percent", "CPU use of the edge-agent process.", ("agent_cpu_percent",)),
    ("edge_fleet_device_memory_used_bytes", "Device memory in use.", ("memory", "used")),
    ("edge_fleet_device_memory_available_bytes", "Device memory available.", ("memory", "available")),
    ("edge_fleet_agent_rss_bytes", "Resident memory of the edge-agent process.", ("memory", "agent_rss")),
    ("edge_fleet_device_disk_free_bytes", "Free space of the agent's state folder.", ("disk_free_bytes",)),
    ("edge_fleet_device_soc_temperature_celsius", "SoC temperature (boards with a thermal zone).", ("soc_temp_c",)),
    # With forward.ack = "collector" a row leaves the device only once a collector
    # acked it, so the rows are the unacked backlog and the oldest age is the lag.
    ("edge_fleet_buffer_rows", "Unacked backlog: results the device holds, not yet stored centrally.", ("buffer", "rows")),
    ("edge_fleet_buffer_bytes", "Bytes of the results the device holds.", ("buffer", "bytes")),
    ("edge_fleet_buffer_oldest_age_seconds", "Lag: age of the oldest result the device holds.", ("buffer", "oldest_age_s")),
]  # fmt: skip


def _get(payload: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    value: Any = payload
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class FleetCollector:
    """Prometheus collector over a ``FleetState``: one label set per device/model."""

    def __init__(
        self,
        fleet: FleetState,
        *,
        connected: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
        figures: CollectorFigures | None = None,
        rollouts: RolloutPlans | None = None,
    ) -> None:
        self.fleet = fleet
        self.rollouts = rollouts if rollouts is not None else RolloutPlans(fleet.topics)
        self.connected = connected
        self.clock = clock
        self.figures = figures
        self.messages: dict[str, int] = {"status": 0, "health": 0}

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        devices = self.fleet.snapshot()
        yield from self._device_metrics(devices, now)
        yield from self._model_metrics(devices)
        yield from self.rollouts.collect(now)
        yield from self._exporter_metrics()
        if self.figures is not None:
            yield from self.figures.collect(now)

    def _device_metrics(self, devices: list[DeviceState], now: float) -> Iterator[Metric]:
        online = GaugeMetricFamily(
            "edge_fleet_device_online", "1 when the device's retained status is online.", labels=DEV
        )
        info = GaugeMetricFamily(
            "edge_fleet_device_info",
            "Always 1; the agent version as a label.",
            labels=[*DEV, "agent_version"],
        )
        seen = GaugeMetricFamily(
            "edge_fleet_device_last_seen_age_seconds",
            "Seconds since the exporter last heard from the device (live status or health).",
            labels=DEV,
        )
        health_age = GaugeMetricFamily(
            "edge_fleet_device_health_age_seconds",
            "Seconds since the device's latest health report.",
            labels=DEV,
        )
        counts = GaugeMetricFamily(
            "edge_fleet_devices", "Devices known, by fleet and state.", labels=["fleet", "state"]
        )
        load = GaugeMetricFamily(
            "edge_fleet_device_load_average",
            "Load average over 1, 5 and 15 minutes.",
            labels=[*DEV, "period"],
        )
        gauges = [
            (GaugeMetricFamily(name, text, labels=DEV), path) for name, text, path in _HEALTH_GAUGES
        ]
        dropped = CounterMetricFamily(
            "edge_fleet_buffer_dropped",
            "Results the device dropped, by reason (device's own count).",
            labels=[*DEV, "reason"],
        )
        reconnects = CounterMetricFamily(
            "edge_fleet_mqtt_reconnects",
            "MQTT reconnects of the device's agent (device's own count).",
            labels=DEV,
        )
        forwarded = CounterMetricFamily(
            "edge_fleet_results_forwarded",
            "Results the device forwarded to the broker (device's own count).",
            labels=DEV,
        )
        tally: dict[tuple[str, str], int] = {}
        for d in devices:
            labels = [d.device, d.fleet or ""]
            state = d.state
            tally[(labels[1], state)] = tally.get((labels[1], state), 0) + 1
            online.add_metric(labels, 1.0 if state == "online" else 0.0)
            version = (d.status or {}).get("agent_version") or (d.health or {}).get("agent_version")
            info.add_metric([*labels, str(version or "")], 1.0)
            if d.last_seen_at is not None:
                seen.add_metric(labels, max(0.0, now - d.last_seen_at))
            if d.health_at is None or d.health is None:
                continue
            health = d.health
            health_age.add_metric(labels, max(0.0, now - d.health_at))
            for family, path in gauges:
                value = _get(health, path)
                if value is not None:
                    family.add_metric(labels, value)
            averages = health.get("load")
            if isinstance(averages, list):
                for period, value in zip(("1m", "5m", "15m"), averages, strict=False):
                    if isinstance(value, int | float):
                        load.add_metric([*labels, period], float(value))
            drops = (health.get("buffer") or {}).get("dropped")
            counted = dict.fromkeys(DROP_REASONS, 0.0)
            if isinstance(drops, dict):
                for reason, n in drops.items():
                    if isinstance(n, int | float) and not isinstance(n, bool):
                        counted[str(reason)] = float(n)
            for reason, n in sorted(counted.items()):
                dropped.add_metric([*labels, reason], n)
            n = _get(health, ("mqtt", "reconnects"))
            if n is not None:
                reconnects.add_metric(labels, n)
            n = _get(health, ("forwarded",))
            if n is not None:
                forwarded.add_metric(labels, n)
        for (fleet, state), n in sorted(tally.items()):
            counts.add_metric([fleet, state], float(n))
        yield from (online, info, seen, health_age, counts, load)
        yield from (family for family, _ in gauges)
        yield from (dropped, reconnects, forwarded)

    def _model_metrics(self, devices: list[DeviceState]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "edge_fleet_model_info",
            "Always 1; a model's active version, previous version and deployment state.",
            labels=[*MODEL, "previous", "state"],
        )
        desired = GaugeMetricFamily(
            "edge_fleet_model_desired_info",
            "Always 1; the version the applicable desired manifest asks of the device, "
            "where it came from (fleet or device) and what the device decided about it.",
            labels=[*MODEL, "source", "decision"],
        )
        inferences = CounterMetricFamily(
            "edge_fleet_model_inferences",
            "Inferences, summed over the health reports this exporter received.",
            labels=MODEL,
        )
        errors = CounterMetricFamily(
            "edge_fleet_model_errors",
            "Inferences the model itself failed (run-time errors, non-finite outputs), "
            "summed over the health reports this exporter received.",
            labels=MODEL,
        )
        bad_requests = CounterMetricFamily(
            "edge_fleet_model_bad_requests",
            "Requests refused as the caller's mistake (4xx: bad rows, wrong shape), "
            "summed over the health reports this exporter received.",
            labels=MODEL,
        )
        p50 = GaugeMetricFamily(
            "edge_fleet_model_latency_p50_seconds",
            "Median latency in the latest health window.",
            labels=MODEL,
        )
        p99 = GaugeMetricFamily(
            "edge_fleet_model_latency_p99_seconds",
            "99th percentile latency in the latest health window.",
            labels=MODEL,
        )
        for d in devices:
            dev = [d.device, d.fleet or ""]
            for name, m in ((d.status or {}).get("models") or {}).items():
                if m.get("state") is not None:
                    labels = [*dev, name, str(m.get("version") or "")]
                    info.add_metric([*labels, str(m.get("previous") or ""), str(m["state"])], 1.0)
                wanted = m.get("desired")
                if isinstance(wanted, dict) and wanted.get("version") is not None:
                    desired.add_metric(
                        [*dev, name, str(wanted["version"]),
                         str(wanted.get("source") or ""), str(wanted.get("decision") or "")],
                        1.0,
                    )  # fmt: skip
            # Every version this exporter counted, so an upgrade does not cut off the
            # old version's series before its last increase is scraped.
            for (name, version), c in sorted(d.counters.items()):
                inferences.add_metric([*dev, name, version], float(c.inferences))
                errors.add_metric([*dev, name, version], float(c.errors))
                bad_requests.add_metric([*dev, name, version], float(c.bad_requests))
            # Latency belongs to the version the health window measured.
            for name, h in ((d.health or {}).get("models") or {}).items():
                labels = [*dev, name, str(h.get("version") or "")]
                for family, key in ((p50, "p50_ms"), (p99, "p99_ms")):
                    if isinstance(h.get(key), int | float):
                        family.add_metric(labels, float(h[key]) / 1000.0)
        yield from (info, desired, inferences, errors, bad_requests, p50, p99)
        yield from quality_metrics(devices)

    def _exporter_metrics(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "edge_fleet_exporter_broker_connected",
            "1 while the exporter is connected to the broker.",
        )
        connected.add_metric([], 1.0 if self.connected is None or self.connected() else 0.0)
        messages = CounterMetricFamily(
            "edge_fleet_exporter_messages",
            "Status, health and rollout messages received.",
            labels=["kind"],
        )
        for kind, n in sorted(self.messages.items()):
            messages.add_metric([kind], float(n))
        invalid = CounterMetricFamily(
            "edge_fleet_exporter_invalid_messages",
            "Messages ignored because their payload was not the documented shape.",
        )
        invalid.add_metric([], float(self.fleet.invalid_messages + self.rollouts.invalid_messages))
        yield from (connected, messages, invalid)


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port``, ``:port``, ``[::1]:port`` or ``port`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", value
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen: {value!r} is not HOST:PORT (e.g. 0.0.0.0:9108)")
    return host, int(port)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "exporter",
        help="serve the fleet's status and health as Prometheus metrics",
        description="Subscribe to every device's status and health and serve them on /metrics.",
    )
    parser.add_argument(
        "--listen",
        required=True,
        metavar="ADDR",
        help="HOST:PORT to serve /metrics on, e.g. 0.0.0.0:9108",
    )
    parser.add_argument(
        "--share-group",
        metavar="GROUP",
        help="take health through the MQTT 5 shared subscription $share/GROUP/... (split a fleet between exporters)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="also serve what edge-fleet collect stored: sqlite:///PATH or postgresql://...",
    )
    parser.add_argument(
        "--db-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="read the database at most once per S seconds, however often scraped (5)",
    )
    add_broker_arguments(parser)
    parser.set_defaults(func=run)
    return parser


_NO_SHARE = (
    "--share-group: {where}, which has no shared subscriptions; leave it out (each"
    " exporter then takes every device's health)"
)


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    options = broker_options(args)
    topics = options.topics
    health_topic = topics.all_health()
    if args.share_group:
        if any(c in args.share_group for c in "/+#"):
            raise UsageError(
                f"--share-group: {args.share_group!r} must not contain '/', '+' or '#'"
            )
        if options.protocol == "3.1.1":
            raise UsageError(_NO_SHARE.format(where="--mqtt-protocol 3.1.1"))
        health_topic = f"$share/{args.share_group}/{health_topic}"
    if args.db_interval < 0:
        raise UsageError(f"--db-interval: {args.db_interval:g} is negative")
    figures = CollectorFigures(args.db, interval=args.db_interval) if args.db else None
    if figures is not None:
        figures.open()  # a bad URL or a missing driver fails now; a database down does not
    fleet = FleetState(topics)
    rollouts = RolloutPlans(topics)
    collector = FleetCollector(fleet, figures=figures, rollouts=rollouts)

    def on_message(message: mqtt.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        collector.messages[kind] = collector.messages.get(kind, 0) + 1
        if not rollouts.receive(message.topic, message.payload):
            fleet.receive(message.topic, message.payload, retained=bool(message.retain))

    client = connect(
        options,
        purpose="exporter",
        subscriptions=[(topics.all_status(), 1), (health_topic, 0), (topics.all_rollouts(), 1)],
        on_message=on_message,
    )
    if args.share_group and not client.mqtt5:
        disconnect(client)
        raise UsageError(_NO_SHARE.format(where=f"broker {client.url} speaks MQTT 3.1.1"))
    collector.connected = client.is_connected
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        disconnect(client)
        if figures is not None:
            figures.close()
        raise EdgeError(f"--listen: {args.listen}: cannot serve: {e.strerror or e}") from None
    bound = server.server_address[1]
    print(
        f"edge-fleet exporter: serving http://{host}:{bound}/metrics", file=sys.stderr, flush=True
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        disconnect(client)
        if figures is not None:
            figures.close()
    log.info("exporter stopped")
    return 0
