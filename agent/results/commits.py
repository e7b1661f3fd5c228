"""Group commit: rows queued by many request threads, written in few transactions.

In ``commit`` durability the first waiting caller becomes the leader and writes
everyone's pending rows in one transaction, so sixteen concurrent requests cost one
commit, not sixteen; the next batch's lead is handed to one of its own waiters. In
``batched`` durability ``queue`` returns at once and ``flush`` (the buffer's writer
thread) commits what is queued. Every row gets its ``seq`` here, in queue order, so
rows are committed in seq order: what lets a forwarded batch name a whole seq range.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

Row = tuple[Any, ...]


class _Batch:
    """Rows committed together, and the waiters of that one commit."""

    __slots__ = ("cond", "done", "failed", "lead", "rows")

    def __init__(self, lock: threading.Lock) -> None:
        self.rows: list[Row] = []
        self.cond = threading.Condition(lock)
        self.done = False
        self.failed = False
        self.lead = False  # handed the lead: one of its waiters commits it


class GroupCommit:
    """Seq numbering and the commit queue in front of ``write``.

    ``write(rows)`` commits rows (each ``(seq, *fields)``) in one transaction and
    returns False when they could not be written (they are then counted as dropped by
    the caller); it is called by one thread at a time.
    """

    def __init__(self, next_seq: int, batched: bool, write: Callable[[list[Row]], bool]) -> None:
        self._write = write
        self._batched = batched
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._open = _Batch(self._lock)  # rows queued for the next commit
        self._leader = False  # a caller is committing (commit durability)
        self._next_seq = next_seq
        self._committed_seq = next_seq - 1  # every seq <= this is settled

    @property
    def committed_seq(self) -> int:
        with self._lock:
            return self._committed_seq

    def queue(self, fields: list[Any]) -> int | None:
        """Give a row its seq and queue it; in ``commit`` durability, return once it is
        committed. Returns the seq, or None when the commit failed."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            batch = self._open
            batch.rows.append((seq, *fields))
            if self._batched:
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

    def flush(self) -> None:
        """Commit what is queued now (the batched mode's writer; also used at close)."""
        # One flusher at a time, held from taking the batch to writing it, so batches
        # are committed in the order they were taken.
        with self._flush_lock:
            with self._lock:
                if self._leader or not self._open.rows:
                    return  # in commit durability a leader is already on its way
                batch, self._open = self._open, _Batch(self._lock)
            self._commit(batch)

    def _commit(self, batch: _Batch) -> None:
        """Write one batch, wake its waiters, pass the lead on."""
        try:
            batch.failed = not self._write(batch.rows)
        finally:
            with self._lock:
                self._committed_seq = max(self._committed_seq, batch.rows[-1][0])
                batch.done = True
                batch.cond.notify_all()
                if self._open.rows and not self._batched:
                    # Group commit: one waiter of the next batch writes it for everyone.
                    self._open.lead = True
                    self._open.cond.notify()
                else:
                    self._leader = False
