"""The buffer's bounds: max_rows, max_bytes and max_age drop the oldest rows first.

Runs inside the buffer's write transactions and answers what it deleted, by reason;
the buffer accounts for it (counters, drops by reason).
"""

from __future__ import annotations

import sqlite3
import time

from agent.config import BufferConfig
from agent.results import schema
from agent.results.rows import MAX_AGE, MAX_BYTES, MAX_ROWS

AGE_CHECK_INTERVAL_S = 1.0  # max_age is looked at once a second, not on every commit
EXPIRE_BATCH = 10_000  # rows expired per transaction at most


class Bounds:
    def __init__(self, cfg: BufferConfig) -> None:
        self.cfg = cfg
        self.next_age_check = 0.0  # time.time() from which age_due() is true

    def enforce(
        self, conn: sqlite3.Connection, rows: int, nbytes: int
    ) -> list[tuple[str, list[int]]]:
        """Delete past max_rows / max_bytes (and max_age, once a second): (reason, sizes)."""
        out: list[tuple[str, list[int]]] = []
        if rows > self.cfg.max_rows:
            out.append((MAX_ROWS, self._delete_oldest(conn, rows - self.cfg.max_rows)))
            nbytes -= sum(out[-1][1])
        if nbytes > self.cfg.max_bytes:
            count = schema.oldest_covering(conn, nbytes - self.cfg.max_bytes)
            out.append((MAX_BYTES, self._delete_oldest(conn, count)))
        if self.age_due():
            out.append((MAX_AGE, self.expire(conn)))
        return out

    def age_due(self) -> bool:
        return time.time() >= self.next_age_check

    def expired_waiting(self, conn: sqlite3.Connection) -> bool:
        """Whether the oldest row is past max_age (marks the age as checked)."""
        now = time.time()
        self.next_age_check = now + AGE_CHECK_INTERVAL_S
        oldest = schema.oldest_time(conn)
        return oldest is not None and oldest < now - self.cfg.max_age

    def expire(self, conn: sqlite3.Connection) -> list[int]:
        """Delete rows older than max_age, oldest first, a bounded number per call."""
        if not self.expired_waiting(conn):
            return []
        schema.keep_high_water(conn)
        return schema.delete_oldest(conn, EXPIRE_BATCH, before=time.time() - self.cfg.max_age)

    @staticmethod
    def _delete_oldest(conn: sqlite3.Connection, count: int) -> list[int]:
        schema.keep_high_water(conn)
        return schema.delete_oldest(conn, count)
