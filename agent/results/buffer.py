"""The result buffer: every answered prediction kept in SQLite until it is delivered
(committed centrally, by the collector's ack; or the broker's PUBACK, ``forward.ack``).

One module owns the database. WAL mode with ``synchronous=NORMAL``: a committed row
survives a kill -9 of the agent (the WAL is in the OS page cache and is replayed on
open); only a power cut can lose the last commits before a checkpoint, the price of
not fsyncing an SD card on every request.

Durability ``commit`` (the default) returns from ``record`` only once the row is
committed, with *group commit* (``agent/results/commits.py``): sixteen concurrent
requests cost one commit, not sixteen. Durability ``batched`` returns at once and a writer thread commits
every ``flush_interval_ms``: that interval is the loss window on a crash.

Bounds (``max_rows``, ``max_bytes``, ``max_age``) drop the oldest rows first, and every
drop is counted by reason in the database itself, so counts survive restarts. A full
disk never stops serving: the rows that cannot be written are dropped and counted
(``disk_full``) and the answer still goes out.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import BufferConfig
from agent.loops import Loop
from agent.results import schema
from agent.results.bounds import AGE_CHECK_INTERVAL_S, Bounds
from agent.results.commits import GroupCommit
from agent.results.drops import Drops
from agent.results.rows import (
    DISK_FULL,
    IO_ERROR,
    MAX_AGE,
    BufferCollector,
    BufferedRow,
    BufferStats,
    JsonBatch,
    Result,
    dumps,
)

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["BufferStats", "BufferedRow", "JsonBatch", "Result", "ResultBuffer"]

# Fixed per-row cost added to the payload size so max_bytes tracks the file, not just JSON.
_ROW_OVERHEAD = 64


class ResultBuffer:
    """SQLite-backed, bounded, crash-safe queue of inference results."""

    def __init__(self, path: Path, cfg: BufferConfig, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = schema.connect(self.path)

        # One writer on the connection (the group commit calls _write under it too).
        self._write_lock = threading.Lock()
        self._bounds = Bounds(cfg)
        self._recorded = 0

        # The high-water mark: the newest row, or what meta kept when rows were deleted.
        row = self._conn.execute(
            "SELECT max((SELECT value FROM meta WHERE key='last_seq'),"
            " (SELECT coalesce(max(seq), 0) FROM results))"
        ).fetchone()
        self._commits = GroupCommit(int(row[0]) + 1, cfg.durability == "batched", self._write)
        self._rows, self._bytes = self._count()
        self._drops = Drops(self._conn)

        self._undeleted: list[tuple[int, int]] = []  # delivered ranges a full disk kept
        self._undeleted_rows = self._undeleted_bytes = 0
        self._undeleted_tried = 0.0
        self._flusher: Loop | None = None
        if cfg.durability == "batched":
            interval = cfg.flush_interval_ms / 1000
            self._flusher = Loop(
                "buffer-flush", self._flush_step, stall_s=max(60.0, 10 * interval),
                first_wait_s=interval,
            )  # fmt: skip
            self._flusher.start()
        if metrics is not None:
            metrics.registry.register(BufferCollector(self))

    def _count(self) -> tuple[int, int]:
        return schema.count_range(self._conn, 0, 2**63 - 1)

    # --- the hot path ------------------------------------------------------------

    def wants(self) -> bool:
        """Whether the next result should be recorded (``record`` = all / sample / none)."""
        if self.cfg.record == "all":
            return True
        if self.cfg.record == "none":
            return False
        return random.random() < self.cfg.sample_rate

    def record(self, result: Result) -> int | None:
        """Queue one result; in ``commit`` durability, return once it is committed.

        Returns its ``seq``, or None when it was not recorded (sampling, or dropped
        because the disk is full).
        """
        if not self.wants():
            return None
        inputs: str | None = None
        if self.cfg.record_inputs == "all":
            inputs = dumps(result.inputs)
        elif self.cfg.record_inputs == "hash":
            # Equal inputs hash equally, so duplicates can still be found centrally.
            digest = hashlib.sha256(dumps(result.inputs).encode()).hexdigest()
            inputs = f'{{"sha256":"{digest}"}}'
        outputs = dumps(result.outputs)
        size = len(outputs) + len(result.model) + len(result.version) + _ROW_OVERHEAD
        size += len(inputs) if inputs is not None else 0
        return self._commits.queue(
            [result.time, result.model, result.version, inputs, outputs, result.latency_ms,
             size, result.request_id, None]
        )  # fmt: skip

    def record_feedback(self, feedback: Mapping[str, Any], t: float | None = None) -> int | None:
        """Queue the ground truth for an earlier result (``payloads.feedback()``).

        It takes the next seq and travels like a result; never sampled away.
        """
        text = dumps(feedback)
        return self._commits.queue(
            [time.time() if t is None else t, "", "", None, None, None,
             len(text) + _ROW_OVERHEAD, None, text]
        )  # fmt: skip

    def _write(self, rows: list[tuple[Any, ...]]) -> bool:
        """The group commit's writer: one transaction; False (rows counted as dropped)
        when it cannot be written."""
        try:
            with self._write_lock:
                self._insert(rows)
        except sqlite3.Error as e:
            reason = DISK_FULL if _is_disk_full(e) else IO_ERROR
            self._drops.not_recorded(reason, len(rows), e)
            return False
        return True

    def _insert(self, batch: list[tuple[Any, ...]]) -> None:
        def insert() -> None:
            self._conn.executemany(
                "INSERT INTO results (seq, time, model, version, inputs, outputs, latency_ms,"
                " size, request_id, feedback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
            self._rows += len(batch)
            self._bytes += sum(row[7] for row in batch)
            self._enforce_bounds()

        self._transaction(insert)
        self._recorded += len(batch)

    def _transaction(self, work: Callable[[], None]) -> None:
        """Run ``work`` in one write transaction (the caller holds the write lock)."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        # Delivered rows a full disk kept from being deleted ride along with every write.
        settled = list(self._undeleted)
        try:
            for first, last in settled:
                self._delete_range(first, last)
            work()
            if self._drops.unsaved:
                self._drops.save(c)
            c.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them).
            if c.in_transaction:
                c.execute("ROLLBACK")
            # Counters moved inside the failed transaction: read back what the file holds.
            self._rows, self._bytes = self._count()
            raise
        if settled:
            self._undeleted = [r for r in self._undeleted if r not in settled]
            self._undeleted_rows, self._undeleted_bytes = self._count_ranges(self._undeleted)
            log.info("buffer: %d delivered ranges deleted now that there is room", len(settled))

    def _delete(self, work: Callable[[], None]) -> bool:
        """A deleting transaction; on a full disk the rows stay (nothing is lost).

        The forwarder sends them again later and consumers drop the duplicates by seq.
        """
        try:
            self._transaction(work)
        except sqlite3.OperationalError as e:
            if not _is_disk_full(e):
                raise
            log.warning("buffer: disk full, forwarded rows stay until there is room: %s", e)
            return False
        return True

    # --- bounds ------------------------------------------------------------------

    def _enforce_bounds(self) -> None:
        """Drop the oldest rows past the bounds (inside a transaction)."""
        cfg = self.cfg
        if (
            self._rows <= cfg.max_rows
            and self._bytes <= cfg.max_bytes
            and time.time() < self._bounds.next_age_check
        ):
            return  # every commit comes here: the usual case costs no call
        for reason, deleted in self._bounds.enforce(self._conn, self._rows, self._bytes):
            self._account_drop(deleted, reason)

    def _expire_idle(self) -> None:
        """Expire from the forwarder's side too, so an idle device's backlog ages out."""
        if self._bounds.age_due() and self._bounds.expired_waiting(self._conn):
            self._delete(lambda: self._account_drop(self._bounds.expire(self._conn), MAX_AGE))

    def _account_drop(self, deleted: list[int], reason: str) -> None:
        if not deleted:
            return
        self._rows -= len(deleted)
        self._bytes -= sum(deleted)
        self._drops.add(reason, len(deleted))

    # --- batched durability ------------------------------------------------------

    def flush(self) -> None:
        """Commit what is queued now (the batched mode's writer; also used at close)."""
        self._commits.flush()

    def _flush_step(self) -> float:
        self.flush()
        return self.cfg.flush_interval_ms / 1000

    # --- the forwarder's side ----------------------------------------------------

    def take_batch(self, limit: int, after: int = 0) -> list[BufferedRow]:
        """Up to ``limit`` committed rows with seq above ``after``, oldest first.

        Also expires rows past ``max_age``, so an idle device's backlog ages out too.
        """
        with self._write_lock:
            self._expire_idle()
            rows = self._conn.execute(
                "SELECT seq, time, model, version, inputs, outputs, latency_ms, request_id,"
                " feedback FROM results"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [BufferedRow(*r) for r in rows]

    def stats(self) -> BufferStats:
        with self._write_lock:
            oldest = schema.oldest_time(self._conn, outside=self._undeleted)
            # Delivered rows waiting for their delete are not backlog.
            rows = self._rows - self._undeleted_rows
            nbytes = self._bytes - self._undeleted_bytes
            delivered = self._undeleted_rows
        dropped = self._drops.counts()
        last_seq = self._commits.committed_seq
        return BufferStats(
            rows=rows,
            bytes=nbytes,
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest),
            dropped=dropped,
            recorded=self._recorded,
            last_seq=last_seq,
            delivered=delivered,
        )

    def take_batch_json(self, limit: int, after: int = 0) -> JsonBatch | None:
        """Like ``take_batch``, as one JSON text: the result objects joined by commas."""
        with self._write_lock:
            self._expire_idle()
            count, first, last, text = self._conn.execute(
                schema.BATCH_JSON, (after, limit)
            ).fetchone()
        return JsonBatch(first, last, count, text) if count else None

    def mark_sent_range(self, first: int, last: int) -> bool:
        """Delete every row with ``first <= seq <= last``: they were delivered."""
        return self.mark_sent_ranges([(first, last)])

    def mark_sent_ranges(self, ranges: list[tuple[int, int]]) -> bool:
        """Delete the rows of every range, in one transaction (one SD card write).

        False when the disk is too full to delete. The rows are then remembered as
        delivered: not backlog in ``stats``, not sent again while the agent runs, and
        deleted with the next write that succeeds, or by ``retry_deletes`` (after a
        restart they are sent again; consumers drop duplicates by seq).
        """

        def delete_all() -> None:
            for first, last in ranges:
                self._delete_range(first, last)

        with self._write_lock:
            if self._delete(delete_all):
                return True
            self._undeleted.extend(ranges)
            self._undeleted_rows, self._undeleted_bytes = self._count_ranges(self._undeleted)
            return False

    def retry_deletes(self) -> None:
        """Try the remembered deletes again (at most once a second); the forwarder calls it."""
        now = time.monotonic()
        if not self._undeleted or now - self._undeleted_tried < AGE_CHECK_INTERVAL_S:
            return
        self._undeleted_tried = now
        with self._write_lock:
            if self._undeleted:
                self._delete(lambda: None)  # the transaction carries them

    def _delete_range(self, first: int, last: int) -> None:
        schema.keep_high_water(self._conn)
        rows, size = schema.delete_range(self._conn, first, last)
        self._rows -= rows
        self._bytes -= size

    def _count_ranges(self, ranges: list[tuple[int, int]]) -> tuple[int, int]:
        counts = [schema.count_range(self._conn, first, last) for first, last in ranges]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    # --- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Commit what is pending and close; the supervisor calls this last."""
        if self._flusher is not None:
            self._flusher.stop(5)
        self.flush()
        with self._write_lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:  # a full disk must not block shutdown
                log.warning("buffer: checkpoint at close failed: %s", e)
            self._conn.close()


def _is_disk_full(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(e) or "No space" in str(e)
