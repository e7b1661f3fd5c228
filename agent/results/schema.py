"""The result buffer's SQLite file: how it is opened, its schema and its migrations.

WAL with ``synchronous=NORMAL`` and a small WAL (see ``connect``); the schema changes
only by appending a migration, and ``PRAGMA user_version`` counts the applied ones, so
an agent upgraded on a device with a backlog opens the old file and carries it on.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

# sqlite-utils imports pandas whenever it is installed, for DataFrame support the buffer
# never uses: 44 MiB of RSS on a 1 GB device. Hide it for that one import only.
_pandas_loaded = "pandas" in sys.modules
if not _pandas_loaded:
    sys.modules["pandas"] = None  # type: ignore[assignment]
try:
    import sqlite_utils
finally:
    if not _pandas_loaded:
        del sys.modules["pandas"]


# A smaller WAL than SQLite's default 4 MiB: checkpoints stay short on an SD card and a
# full disk needs less room to fold the WAL back into the database.
WAL_PAGES = 256


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the buffer database, migrated to the current schema."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db = sqlite_utils.Database(conn)
    db.enable_wal()
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
    migrate(conn, db)
    return conn


def migrate(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, step in enumerate(_MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# --- schema migrations: append only; PRAGMA user_version counts the applied ones ---

_MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def _migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[..., None]:
    _MIGRATIONS.append(fn)
    return fn


@_migration
def _m1_initial(db: sqlite_utils.Database) -> None:
    db.table("results").create(
        {
            "seq": int,
            "time": float,
            "model": str,
            "version": str,
            "inputs": str,
            "outputs": str,
            "latency_ms": float,
            "size": int,
        },
        pk="seq",
    )
    db.table("drops").create({"reason": str, "count": int}, pk="reason")
    # The seq high-water mark survives even when every row has been forwarded,
    # so a seq is never reused and consumers can drop duplicates by it.
    db.table("meta").create({"key": str, "value": int}, pk="key")
    db.table("meta").insert({"key": "last_seq", "value": 0})


@_migration
def _m2_request_ids_and_feedback(db: sqlite_utils.Database) -> None:
    # request_id: the caller's id for the request, when it gave one. feedback: set on a
    # feedback row (POST /feedback), the JSON of payloads.feedback(); such a row has no
    # model, inputs or outputs of its own, and shares the seq sequence with results.
    db.table("results").add_column("request_id", str)
    db.table("results").add_column("feedback", str)


# The forwarder's fast path: SQLite writes each result's JSON and joins the batch,
# and a range delete settles it. Half the CPU of take_batch + a delete per seq per result,
# which is what lets a backlog drain without slowing /predict (bench/forward.py).
BATCH_JSON = (
    "SELECT count(*), min(seq), max(seq), group_concat(j, ',') FROM (SELECT seq,"
    """ CASE WHEN feedback IS NOT NULL THEN"""
    """ '{"seq":' || seq || ',"time":' || coalesce(time, 'null') || ',"feedback":'"""
    """ || feedback || '}' ELSE"""
    # coalesce: one NULL would make the whole object NULL and group_concat skip it.
    """ '{"seq":' || seq || ',"time":' || coalesce(time, 'null') || ',"model":'"""
    """ || json_quote(model) || ',"version":' || json_quote(version) || ',"inputs":'"""
    """ || coalesce(inputs, 'null') || ',"outputs":' || coalesce(outputs, 'null')"""
    """ || ',"latency_ms":' || coalesce(latency_ms, 'null')"""
    """ || CASE WHEN request_id IS NULL THEN '' ELSE ',"request_id":'"""
    """ || json_quote(request_id) END || '}' END AS j"""
    " FROM results WHERE seq > ? ORDER BY seq LIMIT ?)"
)


# --- the statements the buffer's bounds run (inside its transactions) -----------------


def keep_high_water(conn: sqlite3.Connection) -> None:
    """Remember the newest seq in ``meta`` before rows are deleted: never reused."""
    conn.execute(
        "UPDATE meta SET value = max(value, (SELECT coalesce(max(seq), 0) FROM results))"
        " WHERE key='last_seq'"
    )


def delete_oldest(conn: sqlite3.Connection, count: int, before: float | None = None) -> list[int]:
    """Delete up to ``count`` oldest rows (only those older than ``before`` if given);
    returns the sizes of the deleted rows."""
    if before is None:
        rows = conn.execute(
            "DELETE FROM results WHERE seq IN (SELECT seq FROM results ORDER BY seq LIMIT ?)"
            " RETURNING size",
            (count,),
        ).fetchall()
    else:
        rows = conn.execute(
            "DELETE FROM results WHERE seq IN (SELECT seq FROM results ORDER BY seq LIMIT ?)"
            " AND time < ? RETURNING size",
            (count, before),
        ).fetchall()
    return [int(size) for (size,) in rows]


def oldest_covering(conn: sqlite3.Connection, excess: int) -> int:
    """How many of the oldest rows add up to at least ``excess`` bytes."""
    count, total = 0, 0
    cursor = conn.execute("SELECT size FROM results ORDER BY seq")
    for (size,) in cursor:
        count += 1
        total += size
        if total >= excess:
            break
    cursor.close()
    return count


def oldest_time(
    conn: sqlite3.Connection, outside: list[tuple[int, int]] | None = None
) -> float | None:
    """Time of the oldest row, leaving out the seq ranges in ``outside``."""
    where = " AND ".join("NOT (seq BETWEEN ? AND ?)" for _ in outside or [])
    sql = f"SELECT time FROM results {'WHERE ' + where if where else ''} ORDER BY seq LIMIT 1"
    params = [n for r in outside or [] for n in r]
    row = conn.execute(sql, params).fetchone()
    return None if row is None else float(row[0])


def add_drops(conn: sqlite3.Connection, drops: dict[str, int]) -> None:
    for reason, n in drops.items():
        conn.execute(
            "INSERT INTO drops (reason, count) VALUES (?, ?)"
            " ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
            (reason, n),
        )


def count_range(conn: sqlite3.Connection, first: int, last: int) -> tuple[int, int]:
    """Rows and bytes with ``first <= seq <= last``."""
    rows, size = conn.execute(
        "SELECT count(*), total(size) FROM results WHERE seq BETWEEN ? AND ?", (first, last)
    ).fetchone()
    return int(rows), int(size)


def delete_range(conn: sqlite3.Connection, first: int, last: int) -> tuple[int, int]:
    """Delete ``first <= seq <= last``; returns the rows and bytes deleted."""
    counted = count_range(conn, first, last)
    conn.execute("DELETE FROM results WHERE seq BETWEEN ? AND ?", (first, last))
    return counted
