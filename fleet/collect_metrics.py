"""The collector's own Prometheus metrics (``edge-fleet collect --metrics ADDR``).

They live in a registry of their own, so a test or a second collector in one process
does not collide with another's series, and they are counted whether or not anyone
serves them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A transaction of a few thousand rows takes milliseconds; a retry after the database
# came back, seconds.
_STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class CollectorMetrics:
    """Counters the intake and the writer update (``fleet.intake.Counts`` and more)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.messages = Counter(
            "edge_collector_messages", "MQTT messages received, by kind.", ["kind"], registry=reg
        )
        self.rows_stored = Counter(
            "edge_collector_rows_stored",
            "Rows inserted into the database, by table (a duplicate is not counted).",
            ["table"],
            registry=reg,
        )
        self.duplicates = Counter(
            "edge_collector_duplicates",
            "Result and feedback rows received again and already stored (acknowledged again).",
            registry=reg,
        )
        self.batches = Counter("edge_collector_batches", "Transactions committed.", registry=reg)
        self.store_seconds = Histogram(
            "edge_collector_store_seconds",
            "Time of one committed transaction.",
            buckets=_STORE_BUCKETS,
            registry=reg,
        )
        self.invalid_messages = Counter(
            "edge_collector_invalid_messages",
            "Messages refused because they are not the documented shape, by kind.",
            ["kind"],
            registry=reg,
        )
        self.failed_messages = Counter(
            "edge_collector_failed_messages",
            "Messages the database refused even alone; dropped (devices resend unacknowledged results).",
            ["kind"],
            registry=reg,
        )
        self.skipped_messages = Counter(
            "edge_collector_skipped_messages",
            "Messages not stored on purpose (--fleet, --partition), by reason.",
            ["reason"],
            registry=reg,
        )
        self.shed_messages = Counter(
            "edge_collector_shed_messages",
            "Messages left at the broker because the collector held its maximum.",
            registry=reg,
        )
        self.acks = Counter(
            "edge_collector_acks", "Result acknowledgements published to devices.", registry=reg
        )
        self.database_up = Gauge(
            "edge_collector_database_up",
            "1 while the last transaction committed, 0 while the database is unavailable.",
            registry=reg,
        )
        self.broker_connected = Gauge(
            "edge_collector_broker_connected", "1 while connected to the broker.", registry=reg
        )
        self.held_rows = Gauge(
            "edge_collector_held_rows", "Rows received and not yet committed.", registry=reg
        )
        self.held_bytes = Gauge(
            "edge_collector_held_bytes",
            "Payload bytes held in memory (bounded by --max-pending-mb).",
            registry=reg,
        )
        self.last_commit = Gauge(
            "edge_collector_last_commit_timestamp_seconds",
            "When the last transaction committed (0: none yet).",
            registry=reg,
        )
        self.database_up.set(1)

    # --- fleet.intake.Counts ---------------------------------------------------------

    def received(self, kind: str) -> None:
        self.messages.labels(kind).inc()

    def invalid(self, kind: str) -> None:
        self.invalid_messages.labels(kind).inc()

    def skipped(self, reason: str) -> None:
        self.skipped_messages.labels(reason).inc()

    def shed(self) -> None:
        self.shed_messages.inc()

    # --- the writer --------------------------------------------------------------------

    def stored(self, inserted: dict[str, int], duplicates: int, seconds: float) -> None:
        for table, n in inserted.items():
            if n:
                self.rows_stored.labels(table).inc(n)
        if duplicates:
            self.duplicates.inc(duplicates)
        self.batches.inc()
        self.store_seconds.observe(seconds)
        self.last_commit.set(time.time())

    def watch(self, connected: Callable[[], bool], held: Callable[[], tuple[int, int]]) -> None:
        """Gauges read at scrape time from the running collector."""
        self.broker_connected.set_function(lambda: 1.0 if connected() else 0.0)
        self.held_rows.set_function(lambda: float(held()[0]))
        self.held_bytes.set_function(lambda: float(held()[1]))

    def value(self, name: str, **labels: Any) -> float:
        """One sample's value (0 when absent), for tests and the log."""
        return self.registry.get_sample_value(name, labels) or 0.0
