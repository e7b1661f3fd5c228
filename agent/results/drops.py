"""Results dropped, counted by reason, in memory and in the buffer's own database.

Counts survive restarts (they are saved in the ``drops`` table with the transaction
that dropped the rows), and the log says so at most once a minute: a full SD card must
not also fill the journal.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from agent.results import schema
from agent.wire.payloads import DROP_REASONS

log = logging.getLogger("agent.results.buffer")

LOG_INTERVAL_S = 60.0


class Drops:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict(
            conn.execute("SELECT reason, count FROM drops").fetchall()
        )
        self.unsaved: dict[str, int] = {}
        self._logged_at = -LOG_INTERVAL_S
        self._log_pending = 0

    def add(self, reason: str, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + count
            self.unsaved[reason] = self.unsaved.get(reason, 0) + count

    def not_recorded(self, reason: str, count: int, error: Exception) -> None:
        """Rows that never made it into the file (a full disk, an I/O error)."""
        self.add(reason, count)
        now = time.monotonic()
        with self._lock:
            self._log_pending += count
            if now - self._logged_at < LOG_INTERVAL_S:
                return
            pending, self._logged_at, self._log_pending = self._log_pending, now, 0
        log.warning("buffer: %d results not recorded (%s): %s", pending, reason, error)

    def save(self, conn: sqlite3.Connection) -> None:
        """Write the unsaved counts inside the caller's transaction."""
        with self._lock:
            unsaved, self.unsaved = self.unsaved, {}
        schema.add_drops(conn, unsaved)

    def counts(self) -> dict[str, int]:
        """Every reason, zeros included: health and /status always list them all."""
        with self._lock:
            return {**dict.fromkeys(DROP_REASONS, 0), **self._counts}
