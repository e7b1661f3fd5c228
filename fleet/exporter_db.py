"""The exporter's collector figures: what ``edge-fleet collect`` stored, read from its database.

``edge-fleet exporter --db URL`` adds, per device, the rows stored, the age of the
newest stored batch and its answer-to-stored delay (from the ``devices`` summary the
collector upserts with every batch, so a scrape never counts the results table), and
live accuracy per model version (from the feedback the collector joined to its
results). The unacked backlog and the lag are the device's own figures and come from
health (``edge_fleet_buffer_rows``, ``edge_fleet_buffer_oldest_age_seconds``).

The database is read at scrape time, at most once per ``interval`` seconds, whatever
the number of scrapers. A database that is down costs one failed read per interval:
the scrape still carries every MQTT figure, plus ``edge_collector_database_up 0`` and
no collector figures (stale ones would look live).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.wire.errors import EdgeError, UsageError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from fleet.db import Database

log = logging.getLogger(__name__)

DEV = ["device", "fleet"]
MODEL = ["model", "version"]


# fleet.db is imported only with --db: the exporter alone needs neither sqlite-utils
# nor a PostgreSQL driver.
def _open(url: str) -> Database:
    from fleet.db import open_database

    return open_database(url, create=False)  # a reader never makes an empty database


def _redact(url: str) -> str:
    from fleet.db_engines import redact

    return redact(url)


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class Reading:
    devices: list[dict[str, Any]]
    accuracy: list[dict[str, Any]]


class CollectorFigures:
    """Collector figures for ``FleetCollector``: a cached read of the collector's database."""

    def __init__(
        self,
        url: str,
        *,
        interval: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.interval = interval
        self.monotonic = monotonic
        self._lock = threading.Lock()  # one read at a time, however many scrapes
        self._db: Database | None = None
        self._reading: Reading | None = None
        self._read_at: float | None = None
        self._trouble: str | None = None  # the last failure logged, to log changes only

    def open(self) -> None:
        """Connect now (at start-up): a bad URL or a missing driver raises UsageError; a
        database that is down is only logged and tried again at scrape time."""
        with self._lock:
            self._connect(strict=True)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def reading(self) -> Reading | None:
        """The latest reading, refreshed when older than ``interval``; None while down."""
        with self._lock:
            now = self.monotonic()
            if self._read_at is not None and now - self._read_at < self.interval:
                return self._reading
            self._read_at = now
            self._reading = self._read()
            return self._reading

    def _connect(self, *, strict: bool = False) -> Database | None:
        if self._db is None:
            try:
                self._db = _open(self.url)
            except Exception as e:  # a scrape never fails on the database; see _failed
                if strict and isinstance(e, UsageError):
                    raise
                self._failed(e)
        return self._db

    def _read(self) -> Reading | None:
        db = self._connect()
        if db is None:
            return None
        try:
            reading = Reading(db.device_summary(), db.accuracy())
        except Exception as e:
            self._failed(e)
            self._drop()  # reopened on the next read, whatever state the connection is in
            return None
        if self._trouble is not None:
            log.info("the collector's database %s is readable again", _redact(self.url))
            self._trouble = None
        return reading

    def _failed(self, error: Exception) -> None:
        # fleet.db's errors name the database; anything else gets its URL and type.
        if isinstance(error, EdgeError):
            reason = str(error)
        else:
            reason = f"{_redact(self.url)}: {type(error).__name__}: {error}"
        if reason != self._trouble:
            log.warning("cannot read the collector's database: %s", reason)
            self._trouble = reason

    def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except Exception as e:  # closing a broken connection may fail too
                log.debug("closing the database: %s", e)

    def collect(self, now: float) -> Iterator[Metric]:
        """The collector figures; ``now`` is the wall clock (the database's times are epoch)."""
        reading = self.reading()
        up = GaugeMetricFamily(
            "edge_collector_database_up",
            "1 when the exporter's latest read of the collector's database succeeded.",
        )
        up.add_metric([], 0.0 if reading is None else 1.0)
        yield up
        if reading is None:
            return
        yield from self._device_figures(reading.devices, now)
        yield from self._model_figures(reading.accuracy)

    def _device_figures(self, rows: list[dict[str, Any]], now: float) -> Iterator[Metric]:
        stored = CounterMetricFamily(
            "edge_collector_results_stored",
            "Results of the device stored in the database (duplicates not counted).",
            labels=DEV,
        )
        age = GaugeMetricFamily(
            "edge_collector_last_stored_age_seconds",
            "Seconds since the collector last stored a result of the device.",
            labels=DEV,
        )
        delay = GaugeMetricFamily(
            "edge_collector_delay_seconds",
            "Answer to stored: delay of the newest result of the newest batch stored.",
            labels=DEV,
        )
        for row in rows:
            labels = [str(row.get("device") or ""), str(row.get("fleet") or "")]
            if not labels[0]:
                continue
            count = _number(row, "results_stored")
            if count is not None:
                stored.add_metric(labels, count)
            at = _number(row, "last_stored_at")
            if at is not None:
                age.add_metric(labels, max(0.0, now - at))
            seconds = _number(row, "last_delay_s")
            if seconds is not None:
                delay.add_metric(labels, max(0.0, seconds))
        yield from (stored, age, delay)

    def _model_figures(self, rows: list[dict[str, Any]]) -> Iterator[Metric]:
        accuracy = GaugeMetricFamily(
            "edge_model_accuracy",
            "Share of ground-truth labels the model version predicted right (all time).",
            labels=MODEL,
        )
        labelled = CounterMetricFamily(
            "edge_model_labelled",
            "Ground-truth labels joined to a stored prediction of the model version.",
            labels=MODEL,
        )
        correct = CounterMetricFamily(
            "edge_model_correct",
            "Labels that matched the model version's prediction.",
            labels=MODEL,
        )
        for row in rows:
            labels = [str(row.get("model") or ""), str(row.get("version") or "")]
            if not labels[0]:
                continue
            for family, key in ((labelled, "labelled"), (correct, "correct")):
                value = _number(row, key)
                if value is not None:
                    family.add_metric(labels, value)
            share = _number(row, "accuracy")
            if share is None and (_number(row, "labelled") or 0) > 0:
                share = (_number(row, "correct") or 0.0) / float(row["labelled"])
            if share is not None:
                accuracy.add_metric(labels, share)
        yield from (accuracy, labelled, correct)
