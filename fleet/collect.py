"""``edge-fleet collect``: every device's results, health, events and status into a database.

The command: options, the database opened (waiting while it is unavailable), the
collector service (fleet/collector.py) started, its metrics served with ``--metrics``,
and SIGTERM/SIGINT turned into a clean stop: the transaction under way and what is
queued are committed and acknowledged, the session is left at the broker, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.wire.errors import BrokerUnavailable, EdgeError, UsageError
from agent.wire.names import name_problem
from prometheus_client import start_http_server

from fleet.collect_metrics import CollectorMetrics
from fleet.collector import (
    DEFAULT_GROUP,
    SESSION_EXPIRY_S,
    Collector,
    Settings,
    default_client_id,
    parse_partition,
)
from fleet.connection import (
    BrokerOptions,
    BrokerUnreachable,
    add_broker_arguments,
    broker_options,
)
from fleet.db import Database, DatabaseUnavailable, open_database

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "collect",
        help="store every device's results, health, events and status in a database",
        description=(
            "Subscribe to every device's results, health, events and status with a"
            " persistent MQTT session and store them in a database; acknowledge stored"
            " results to the devices (docs/collector.md)."
        ),
    )
    parser.add_argument(
        "--db",
        required=True,
        metavar="URL",
        help="sqlite:///PATH (embedded) or postgresql://USER@HOST/DB",
    )
    parser.add_argument("--fleet", metavar="FLEET", help="store only the devices of this fleet")
    parser.add_argument(
        "--group",
        metavar="NAME",
        help=f"shared-subscription group; collectors of one group split the stream"
        f" (default {DEFAULT_GROUP}, or {DEFAULT_GROUP}-FLEET with --fleet)",
    )
    parser.add_argument(
        "--partition",
        metavar="I/N",
        help="store only the devices with crc32(device) %% N == I, for N collectors without"
        " shared subscriptions (MQTT 3.1.1, NATS); each collector sees the whole stream",
    )
    parser.add_argument(
        "--client-id",
        metavar="ID",
        help="MQTT client id, the key of the persistent session (default"
        " edge-collect-HOSTNAME-GROUP); also named in the acks",
    )
    parser.add_argument(
        "--metrics", metavar="ADDR", help="serve Prometheus metrics on HOST:PORT, e.g. :9109"
    )
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument(
        "--session-expiry",
        type=int,
        default=SESSION_EXPIRY_S,
        metavar="S",
        help=f"how long the broker queues for this collector while it is away"
        f" ({SESSION_EXPIRY_S}; 0 for a collector leaving its group for good)",
    )
    tuning.add_argument(
        "--batch-rows", type=int, default=5000, metavar="N", help="rows per transaction (5000)"
    )
    tuning.add_argument(
        "--linger-ms",
        type=float,
        default=50.0,
        metavar="MS",
        help="how long a transaction waits for more rows after its first (50)",
    )
    tuning.add_argument(
        "--max-pending-mb",
        type=float,
        default=64.0,
        metavar="MB",
        help="payload held in memory before messages are left at the broker (64)",
    )
    tuning.add_argument(
        "--receive-maximum",
        type=int,
        default=200,
        metavar="N",
        help="unacknowledged messages the broker may send at once (200)",
    )
    add_broker_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def parse_addr(value: str) -> tuple[str, int]:
    """``host:port``, ``:port``, ``[::1]:port`` or ``port`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", value
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics: {value!r} is not HOST:PORT (e.g. 0.0.0.0:9109)")
    return host, int(port)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def settings_from(args: argparse.Namespace) -> Settings:
    """The service settings, every bad option named."""
    for flag, value in (("--fleet", args.fleet), ("--group", args.group)):
        if value is not None and (problem := name_problem(flag, value)) is not None:
            raise UsageError(problem)
    for flag, value, low in (
        ("--batch-rows", args.batch_rows, 1),
        ("--linger-ms", args.linger_ms, 0),
        ("--max-pending-mb", args.max_pending_mb, 1),
        ("--receive-maximum", args.receive_maximum, 1),
        ("--session-expiry", args.session_expiry, 0),
    ):
        if value < low:
            raise UsageError(f"{flag}: expected at least {low}, got {value}")
    if args.receive_maximum > 65535:
        raise UsageError(f"--receive-maximum: at most 65535, got {args.receive_maximum}")
    partition = parse_partition(args.partition) if args.partition else None
    if partition is not None and args.group is not None:
        raise UsageError(
            f"--partition {args.partition} and --group {args.group}: a partitioned collector"
            " subscribes without a shared group; give one of them"
        )
    group = args.group or (f"{DEFAULT_GROUP}-{args.fleet}" if args.fleet else DEFAULT_GROUP)
    # Collectors of one host need a session each: the partition is part of the default id.
    session = f"{group}-{partition[0]}of{partition[1]}" if partition else group
    return Settings(
        client_id=args.client_id or default_client_id(session),
        group=group,
        fleet=args.fleet,
        batch_rows=args.batch_rows,
        linger_s=args.linger_ms / 1000.0,
        max_bytes=int(args.max_pending_mb * (1 << 20)),
        receive_maximum=args.receive_maximum,
        session_expiry_s=args.session_expiry,
        partition=partition,
        group_given=args.group is not None,
    )


def _open(url: str, stop: threading.Event) -> Database | None:
    """Open the database, waiting while it is unavailable; None when stopped meanwhile."""
    delay = 0.5
    logged = False
    while True:
        try:
            return open_database(url)
        except DatabaseUnavailable as e:
            if not logged:
                log.warning("collector: database unavailable (%s); waiting for it", e)
                logged = True
        if stop.wait(delay):
            return None
        delay = min(delay * 2, 30.0)


def _connected(
    options: BrokerOptions, database: Database, settings: Settings,
    metrics: CollectorMetrics, stop: threading.Event,
) -> Collector | None:  # fmt: skip
    """A started collector, waiting while the broker cannot be reached (a service comes
    up before or after its broker); None when stopped meanwhile. Refusals that waiting
    cannot fix (bad credentials, TLS) still end the command."""
    delay = 0.5
    logged = False
    while True:
        collector = Collector(options, database, settings, metrics)
        try:
            collector.start()
            return collector
        except BrokerUnavailable as e:
            if not _transient(e):
                raise
            if not logged:
                log.warning("collector: %s; waiting for the broker", e)
                logged = True
        if stop.wait(delay):
            return None
        delay = min(delay * 2, 30.0)


def _transient(e: BrokerUnavailable) -> bool:
    """The broker is not there (yet): no TCP connection, or no CONNACK in time. A CONNACK
    that refuses the account, or a failed TLS handshake, is not transient."""
    return isinstance(e, BrokerUnreachable)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    options = broker_options(args)
    if settings.group_given and options.protocol == "3.1.1":
        raise UsageError(
            "--group: MQTT 3.1.1 (--mqtt-protocol) has no shared subscriptions; split the"
            " devices between collectors with --partition I/N"
        )
    metrics_addr = parse_addr(args.metrics) if args.metrics else None
    if not getattr(args, "verbose", False):
        # A service: its state changes (connected, database down and back) are the log.
        for name in ("fleet.collect", "fleet.collector", "fleet.intake"):
            logging.getLogger(name).setLevel(logging.INFO)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    metrics = CollectorMetrics()
    server = thread = None
    if metrics_addr is not None:
        host, port = metrics_addr
        try:
            server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as e:
            raise EdgeError(f"--metrics: {args.metrics}: cannot serve: {e.strerror or e}") from None
        print(
            f"edge-fleet collect: metrics on http://{host}:{server.server_address[1]}/metrics",
            file=sys.stderr,
            flush=True,
        )
    database = _open(args.db, stop)
    if database is None:
        return 0
    collector = _connected(options, database, settings, metrics, stop)
    if collector is None:
        database.close()
        return 0
    try:
        client = collector.client
        assert client is not None
        if settings.partition is not None:
            how = f"partition {settings.partition[0]}/{settings.partition[1]}"
        elif client.mqtt5:
            how = f"group {settings.group}"
        else:
            how = "all devices, no shared subscriptions under MQTT 3.1.1"
        log.info(
            "collector: storing into %s as %s (%s%s; %s over MQTT %s)",
            redact(args.db), settings.client_id, how,
            f", fleet {settings.fleet}" if settings.fleet else "",
            client.url, client.protocol_name,
        )  # fmt: skip
        while not stop.wait(0.5) and collector.failed is None:
            pass
    finally:
        collector.stop()
        database.close()
        if server is not None and thread is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
    if collector.failed is not None:
        raise EdgeError(f"collector: the writer failed: {collector.failed}")
    return 0
