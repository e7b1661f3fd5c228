"""The result buffer: every answered prediction kept in SQLite until the broker has it.

One module owns the database. WAL mode with ``synchronous=NORMAL``: a committed row
survives a kill -9 of the agent (the WAL is in the OS page cache and is replayed on
open); only a power cut can lose the last commits before a checkpoint, the price of
not fsyncing an SD card on every request.

Durability ``commit`` (the default) returns from ``record`` only once the row is
committed, with *group commit*: the first waiting caller becomes the leader and writes
everyone's pending rows in one transaction, so sixteen concurrent requests cost one
commit, not sixteen. Durability ``batched`` returns at once and a writer thread commits
every ``flush_interval_ms``: that interval is the loss window on a crash.

Bounds (``max_rows``, ``max_bytes``, ``max_age``) drop the oldest rows first, and every
drop is counted by reason in the database itself, so counts survive restarts. A full
disk never stops serving: the rows that cannot be written are dropped and counted
(``disk_full``) and the answer still goes out.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import BufferConfig
from agent.loops import Loop
from agent.results import schema
from agent.results.rows import (
    DISK_FULL,
    IO_ERROR,
    MAX_AGE,
    MAX_BYTES,
    MAX_ROWS,
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

_AGE_CHECK_INTERVAL_S = 1.0
_EXPIRE_BATCH = 10_000
_DROP_LOG_INTERVAL_S = 60.0
# Fixed per-row cost added to the payload size so max_bytes tracks the file, not just JSON.
_ROW_OVERHEAD = 64


class _Batch:
    """Rows committed together, and the waiters of that one commit."""

    __slots__ = ("cond", "done", "failed", "lead", "rows")

    def __init__(self, lock: threading.Lock) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.cond = threading.Condition(lock)
        self.done = False
        self.failed = False
        self.lead = False  # handed the lead: one of its waiters commits it


class ResultBuffer:
    """SQLite-backed, bounded, crash-safe queue of inference results."""

    def __init__(self, path: Path, cfg: BufferConfig, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = schema.connect(self.path)

        # _write_lock: one writer on the connection. _lock: the queue state.
        # Order when both are needed: _write_lock, then _lock.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._open = _Batch(self._lock)  # rows queued for the next commit
        self._leader = False  # a caller is committing (commit durability)
        self._last_age_check = 0.0
        self._drop_logged_at = -_DROP_LOG_INTERVAL_S
        self._drop_log_pending = 0
        self._recorded = 0

        # The high-water mark: the newest row, or what meta kept when rows were deleted.
        row = self._conn.execute(
            "SELECT max((SELECT value FROM meta WHERE key='last_seq'),"
            " (SELECT coalesce(max(seq), 0) FROM results))"
        ).fetchone()
        self._next_seq = int(row[0]) + 1
        self._committed_seq = self._next_seq - 1  # every seq <= this is settled
        self._rows, self._bytes = self._count()
        self._dropped: dict[str, int] = dict(
            self._conn.execute("SELECT reason, count FROM drops").fetchall()
        )
        self._unsaved_drops: dict[str, int] = {}

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
        rows, nbytes = self._conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM results"
        ).fetchone()
        return int(rows), int(nbytes)

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
        inputs, outputs = dumps(result.inputs), dumps(result.outputs)
        size = len(inputs) + len(outputs) + len(result.model) + len(result.version) + _ROW_OVERHEAD
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            batch = self._open
            batch.rows.append(
                (seq, result.time, result.model, result.version, inputs, outputs,
                 result.latency_ms, size)
            )  # fmt: skip
            if self.cfg.durability == "batched":
                return seq
            if self._leader:
                # Someone is committing: wait for our batch to be written, or to be
                # handed the lead for it. Only this batch's waiters wake.
                while not (batch.done or batch.lead):
                    batch.cond.wait()
                if batch.done:
                    return None if batch.failed else seq
                batch.lead = False
            self._leader = True
        # Give the threads that are ready to run a moment to join this batch: on one
        # core the leader would otherwise commit before anyone else got the CPU, and
        # every request would pay a whole transaction (measured: 1.1 rows per commit).
        os.sched_yield()
        with self._lock:
            self._open = _Batch(self._lock)
        self._commit(batch)
        return None if batch.failed else seq

    def _commit(self, batch: _Batch) -> None:
        """Write one batch in one transaction, wake its waiters, pass the lead on."""
        try:
            self._write(batch)
        finally:
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        with self._lock:
            batch.done = True
            batch.cond.notify_all()
            if self._open.rows and self.cfg.durability == "commit":
                # Group commit: one waiter of the next batch writes it for everyone.
                self._open.lead = True
                self._open.cond.notify()
            else:
                self._leader = False

    def _write(self, batch: _Batch) -> None:
        try:
            with self._write_lock:
                self._insert(batch.rows)
        except sqlite3.Error as e:
            reason = DISK_FULL if _is_disk_full(e) else IO_ERROR
            batch.failed = True
            with self._lock:
                self._dropped[reason] = self._dropped.get(reason, 0) + len(batch.rows)
                self._unsaved_drops[reason] = self._unsaved_drops.get(reason, 0) + len(batch.rows)
            self._log_drop(reason, len(batch.rows), e)
        with self._lock:
            self._committed_seq = max(self._committed_seq, batch.rows[-1][0])

    def _log_drop(self, reason: str, count: int, error: Exception) -> None:
        # Once a minute at most: a full SD card must not also fill the journal.
        now = time.monotonic()
        self._drop_log_pending += count
        if now - self._drop_logged_at >= _DROP_LOG_INTERVAL_S:
            log.warning(
                "buffer: %d results not recorded (%s): %s", self._drop_log_pending, reason, error
            )
            self._drop_logged_at, self._drop_log_pending = now, 0

    def _insert(self, batch: list[tuple[Any, ...]]) -> None:
        def insert() -> None:
            self._conn.executemany(
                "INSERT INTO results (seq, time, model, version, inputs, outputs, latency_ms,"
                " size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        try:
            work()
            self._save_drops()
            c.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL among them).
            if c.in_transaction:
                c.execute("ROLLBACK")
            # Counters moved inside the failed transaction: read back what the file holds.
            self._rows, self._bytes = self._count()
            raise

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
        """Drop the oldest rows past max_rows / max_bytes / max_age (inside a transaction)."""
        excess_rows = self._rows - self.cfg.max_rows
        if excess_rows > 0:
            self._drop_oldest(excess_rows, MAX_ROWS)
        if self._bytes > self.cfg.max_bytes:
            excess = self._bytes - self.cfg.max_bytes
            self._drop_oldest(schema.oldest_covering(self._conn, excess), MAX_BYTES)
        if time.time() - self._last_age_check >= _AGE_CHECK_INTERVAL_S:
            self._expire()

    def _keep_high_water(self) -> None:
        """Before deleting rows, remember the newest seq so it is never reused.

        Done on deletes only, not on every insert: the newest row is the mark while it
        exists, which saves a page write per commit on the hot path.
        """
        schema.keep_high_water(self._conn)

    def _expire(self) -> None:
        """Drop rows older than max_age, oldest first, a bounded number per call."""
        now = time.time()
        self._last_age_check = now
        if not self._oldest_before(now - self.cfg.max_age):
            return
        self._keep_high_water()
        deleted = schema.delete_oldest(self._conn, _EXPIRE_BATCH, before=now - self.cfg.max_age)
        self._account_drop(deleted, MAX_AGE)

    def _expire_idle(self) -> None:
        """Expire from the forwarder's side too, so an idle device's backlog ages out."""
        now = time.time()
        if now - self._last_age_check < _AGE_CHECK_INTERVAL_S:
            return
        if self._oldest_before(now - self.cfg.max_age):
            self._delete(self._expire)
        self._last_age_check = now

    def _oldest_before(self, cutoff: float) -> bool:
        oldest = schema.oldest_time(self._conn)
        return oldest is not None and oldest < cutoff

    def _drop_oldest(self, count: int, reason: str) -> None:
        self._keep_high_water()
        self._account_drop(schema.delete_oldest(self._conn, count), reason)

    def _account_drop(self, deleted: list[int], reason: str) -> None:
        if not deleted:
            return
        self._rows -= len(deleted)
        self._bytes -= sum(deleted)
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + len(deleted)
            self._unsaved_drops[reason] = self._unsaved_drops.get(reason, 0) + len(deleted)

    def _save_drops(self) -> None:
        with self._lock:
            unsaved, self._unsaved_drops = self._unsaved_drops, {}
        schema.add_drops(self._conn, unsaved)

    # --- batched durability ------------------------------------------------------

    def flush(self) -> None:
        """Commit what is queued now (the batched mode's writer; also used at close)."""
        # One flusher at a time, held from taking the batch to writing it, so batches
        # are committed in the order they were taken.
        with self._flush_lock:
            with self._lock:
                if self._leader or not self._open.rows:
                    return  # in commit durability a leader is already on its way
                batch, self._open = self._open, _Batch(self._lock)
            try:
                self._write(batch)
            finally:
                self._finish(batch)

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
                "SELECT seq, time, model, version, inputs, outputs, latency_ms FROM results"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [BufferedRow(*r) for r in rows]

    def stats(self) -> BufferStats:
        with self._write_lock:
            oldest = schema.oldest_time(self._conn)
            rows, nbytes = self._rows, self._bytes
        with self._lock:
            dropped = dict(self._dropped)
            last_seq = self._committed_seq
        return BufferStats(
            rows=rows,
            bytes=nbytes,
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest),
            dropped=dropped,
            recorded=self._recorded,
            last_seq=last_seq,
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
        """Delete every row with ``first <= seq <= last``: the broker acknowledged them.

        False when the disk is too full to delete: the rows stay, to be sent again.
        """

        def delete() -> None:
            self._keep_high_water()
            rows, size = self._conn.execute(
                "SELECT count(*), total(size) FROM results WHERE seq BETWEEN ? AND ?",
                (first, last),
            ).fetchone()
            self._conn.execute("DELETE FROM results WHERE seq BETWEEN ? AND ?", (first, last))
            self._rows -= int(rows)
            self._bytes -= int(size)

        with self._write_lock:
            return self._delete(delete)

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
