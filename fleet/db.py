"""The collector's database: results, feedback, health, events and status of every device.

``open_database(url)`` opens ``sqlite:///PATH`` (the embedded default) or
``postgresql://...`` (psycopg 3, the ``postgres`` extra) and migrates it to the schema
of ``fleet/db_schema.py``. Both engines run the same statements (written here with ``?``
placeholders) except the bulk insert of results, which ``fleet/db_engines.py`` explains.

``Database.store(batch)`` is one transaction and idempotent: a row stored already (a
redelivery, a device resending after a lost ack, two collectors) is skipped by its
primary key and counted as a duplicate. The same transaction joins feedback to its
result and upserts the ``devices`` summary. When the database is down, ``store()``
raises ``DatabaseUnavailable`` within about two seconds; a connection the server
dropped (a restart) is replaced on the next call.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.wire.errors import EdgeError

from fleet.db_batch import Batch, score
from fleet.db_engines import Engine, engine_for, redact
from fleet.db_schema import DEVICES, MIGRATIONS, RESULTS, SCHEMA_VERSION

__all__ = [
    "Batch",
    "Database",
    "DatabaseError",
    "DatabaseUnavailable",
    "StoreReport",
    "open_database",
]


class DatabaseError(EdgeError):
    """The database refused an operation (not a matter of waiting for it)."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or is not taking writes now; try again later."""


@dataclass(frozen=True)
class StoreReport:
    """What one ``store()`` did."""

    inserted: int  # result rows inserted
    duplicates: int  # result and feedback rows that were stored already
    per_device: dict[str, int] = field(default_factory=dict)  # result rows inserted
    feedback: int = 0  # feedback rows inserted
    joined: int = 0  # feedback rows joined to their result
    health: int = 0
    events: int = 0
    status: int = 0
    seconds: float = 0.0


_INSERT_FEEDBACK = (
    "INSERT INTO feedback (device, seq, time, request_id, result_seq, label, stored_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, seq) DO NOTHING"
)
_INSERT_HEALTH = (
    "INSERT INTO health (device, time, fleet, report, stored_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device, time) DO NOTHING"
)
_INSERT_EVENT = (
    "INSERT INTO events (device, time, event, model, version, serial, reason, payload,"
    " digest, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device, digest) DO NOTHING"
)
_INSERT_STATUS = (
    "INSERT INTO status (device, since, state, fleet, payload, stored_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, since, state) DO NOTHING"
)
# Unjoined feedback of some devices with the result it names: by result_seq, else the
# newest result of the device with that request id.
_UNJOINED = (
    "SELECT f.device, f.seq, f.label, r.model, r.version, r.prediction"
    " FROM feedback f JOIN results r ON r.device = f.device AND r.seq = coalesce("
    "f.result_seq, (SELECT max(q.seq) FROM results q"
    " WHERE q.device = f.device AND q.request_id = f.request_id))"
    " WHERE f.total IS NULL AND f.device IN ({devices})"
)
_JOIN = "UPDATE feedback SET model = ?, version = ?, correct = ?, total = ? WHERE device = ? AND seq = ?"
# Every column's new value is computed from the old row: the newest seq only moves up,
# with its time and delay; counts add up; a fleet once known is kept.
_NEWER = "excluded.last_seq > coalesce(devices.last_seq, 0)"
_UPSERT_DEVICE = (
    "INSERT INTO devices (device, fleet, results_stored, last_seq, last_time,"
    " last_stored_at, last_delay_s) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device) DO UPDATE SET"
    " fleet = coalesce(excluded.fleet, devices.fleet),"
    " results_stored = devices.results_stored + excluded.results_stored,"
    " last_stored_at = coalesce(excluded.last_stored_at, devices.last_stored_at),"
    f" last_time = CASE WHEN {_NEWER} THEN excluded.last_time ELSE devices.last_time END,"
    f" last_delay_s = CASE WHEN {_NEWER} THEN excluded.last_delay_s"
    " ELSE devices.last_delay_s END,"
    f" last_seq = CASE WHEN {_NEWER} THEN excluded.last_seq ELSE devices.last_seq END"
)
_DEVICES_PER_QUERY = 500
_JSON_COLUMNS = ("inputs", "outputs", "prediction")


class Database:
    """One collector's (or reader's) connection to the database; thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self.url = redact(engine.url)
        self.kind = engine.kind
        self._engine = engine
        self._lock = threading.RLock()
        self._conn: Any = None
        with self._lock:
            self._connection()

    # --- writing ---------------------------------------------------------------------

    def store(self, batch: Batch) -> StoreReport:
        """Store everything in ``batch`` in one transaction; rows stored already are
        skipped. Raises DatabaseUnavailable (nothing stored) when the database is down."""
        with self._lock:
            reused = self._conn is not None
            try:
                return self._store(batch)
            except DatabaseUnavailable:
                if not reused or self._conn is not None:
                    raise
                # The connection was dropped since the last call (the server restarted):
                # once more on a new one. Safe either way: the inserts are idempotent.
                return self._store(batch)

    def _store(self, batch: Batch) -> StoreReport:
        started = time.monotonic()
        conn = self._connection()
        engine = self._engine
        now = time.time()
        tail = (now,)
        try:
            conn.execute(engine.begin)
            rows = {device: r for device, r in batch.results.items() if r}
            per_device = engine.insert_results(conn, rows, now) if rows else {}
            feedback = self._many(conn, _INSERT_FEEDBACK, [r + tail for r in batch.feedback])
            touched = sorted(set(rows) | {r[0] for r in batch.feedback})
            joined = self._join_feedback(conn, touched) if touched else 0
            health = self._many(conn, _INSERT_HEALTH, [r + tail for r in batch.health])
            events = self._many(conn, _INSERT_EVENT, [r + tail for r in batch.events])
            status = self._many(conn, _INSERT_STATUS, [r + tail for r in batch.status])
            summary = []
            for device, fleet in sorted(batch.fleets.items()):
                inserted = per_device.get(device, 0)
                seq, t = batch.newest.get(device, (None, None))
                delay = None if t is None else round(now - t, 6)
                stored_at = now if inserted else None
                summary.append((device, fleet, inserted, seq, t, stored_at, delay))
            self._many(conn, _UPSERT_DEVICE, summary)
            conn.execute("COMMIT")
        except BaseException as e:
            self._abandon(conn)
            if isinstance(e, engine.errors):
                raise self._error(e) from None
            raise
        inserted_total = sum(per_device.values())
        offered = sum(len(r) for r in rows.values())
        return StoreReport(
            inserted=inserted_total,
            duplicates=offered - inserted_total + len(batch.feedback) - feedback,
            per_device=per_device,
            feedback=feedback,
            joined=joined,
            health=health,
            events=events,
            status=status,
            seconds=time.monotonic() - started,
        )

    def _many(self, conn: Any, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        cursor = conn.cursor()
        try:
            cursor.executemany(self._engine.sql(sql), rows)
            return max(0, int(cursor.rowcount))
        finally:
            cursor.close()

    def _join_feedback(self, conn: Any, devices: list[str]) -> int:
        """Join the unjoined feedback of ``devices`` to results stored by now."""
        updates = []
        for at in range(0, len(devices), _DEVICES_PER_QUERY):
            chunk = devices[at : at + _DEVICES_PER_QUERY]
            sql = _UNJOINED.format(devices=", ".join("?" * len(chunk)))
            for device, seq, label, model, version, prediction in conn.execute(
                self._engine.sql(sql), chunk
            ).fetchall():
                correct, total = score(json.loads(label), _loads(prediction))
                updates.append((model, version, correct, total, device, seq))
        updates.sort(key=lambda u: (u[4], u[5]))  # one lock order for every collector
        return self._many(conn, _JOIN, updates)

    # --- reading ---------------------------------------------------------------------

    def query_results(
        self,
        *,
        device: str | None = None,
        model: str | None = None,
        version: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stored results matching every filter given, ordered by time (then device,
        seq), oldest first; with ``limit`` the newest ``limit`` of them. ``since`` is
        inclusive, ``until`` exclusive (epoch seconds). inputs, outputs and prediction
        come decoded from their JSON."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("device", device), ("model", model), ("version", version)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time < ?")
            params.append(until)
        columns = ", ".join(RESULTS.names)
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        order = "time, device, seq"
        sql = f"SELECT {columns} FROM results{condition} ORDER BY {order}"
        if limit is not None:
            sql = (
                f"SELECT {columns} FROM (SELECT {columns} FROM results{condition}"
                f" ORDER BY time DESC, device DESC, seq DESC LIMIT ?) AS newest ORDER BY {order}"
            )
            params.append(limit)
        return self._stream(sql, params)

    def query_events(
        self,
        *,
        device: str | None = None,
        fleet: str | None = None,
        model: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Stored deployment events, oldest first; with ``limit`` the newest ``limit``.
        ``fleet`` matches the fleet the collector learned for the device (its stored
        status, or the devices summary); the payload comes decoded."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("device", device), ("model", model)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if fleet is not None:
            where.append(
                "device IN (SELECT device FROM status WHERE fleet = ?"
                " UNION SELECT device FROM devices WHERE fleet = ?)"
            )
            params += [fleet, fleet]
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        names = ("device", "time", "event", "model", "version", "serial", "reason", "payload",
                 "digest")  # fmt: skip
        columns = ", ".join(names)
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {columns} FROM events{condition} ORDER BY time DESC, device DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = [dict(zip(names, r, strict=True)) for r in self._read(sql, params)]
        for row in rows:
            row["payload"] = _loads(row["payload"])
        return rows[::-1]

    def _stream(self, sql: str, params: list[Any]) -> Iterator[dict[str, Any]]:
        # Its own connection: a long export neither holds the lock nor waits for it.
        engine = self._engine
        try:
            conn = engine.connect(writer=False)
        except engine.errors as e:
            raise self._error(e) from None
        try:
            names = RESULTS.names
            for values in engine.stream(conn, sql, params):
                row = dict(zip(names, values, strict=True))
                for key in _JSON_COLUMNS:
                    row[key] = _loads(row[key])
                yield row
        except engine.errors as e:
            raise self._error(e) from None
        finally:
            conn.close()

    def accuracy(self, *, since: float | None = None) -> list[dict[str, Any]]:
        """Per model and version: feedback rows joined, labels compared, labels right."""
        condition = "" if since is None else " AND time >= ?"
        rows = self._read(
            "SELECT model, version, count(*), sum(total), sum(correct) FROM feedback"
            f" WHERE correct IS NOT NULL{condition} GROUP BY model, version ORDER BY model, version",
            [] if since is None else [since],
        )
        return [
            {
                "model": model,
                "version": version,
                "feedback": int(n),
                "labelled": int(labelled),
                "correct": int(correct),
                "accuracy": int(correct) / int(labelled) if labelled else None,
            }
            for model, version, n, labelled, correct in rows
        ]

    def device_summary(self) -> list[dict[str, Any]]:
        """The ``devices`` table: one row per device the collector has stored for."""
        rows = self._read(f"SELECT {', '.join(DEVICES.names)} FROM devices ORDER BY device", [])
        return [dict(zip(DEVICES.names, r, strict=True)) for r in rows]

    def _read(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                conn = self._connection()
                try:
                    return list(conn.execute(self._engine.sql(sql), params).fetchall())
                except self._engine.errors as e:
                    self._abandon(conn)
                    error = self._error(e)
                    if attempt == 2 or not reused or self._conn is not None:
                        raise error from None
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(*self._engine.errors):
                    conn.close()

    # --- the connection ----------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            engine = self._engine
            try:
                conn = engine.connect(writer=True)
            except engine.errors as e:
                raise self._error(e) from None
            try:
                self._migrate(conn)
            except BaseException as e:
                self._abandon(conn)
                conn.close()
                if isinstance(e, engine.errors):
                    raise self._error(e) from None
                raise
            self._conn = conn
        return self._conn

    def _migrate(self, conn: Any) -> None:
        """Apply the steps of MIGRATIONS the database lacks, in one transaction."""
        engine = self._engine
        latest = len(MIGRATIONS)
        if engine.has_table(conn, SCHEMA_VERSION.name) and self._version(conn) == latest:
            return  # the usual case, and all a read-only account may do
        conn.execute(engine.begin)
        engine.lock_schema(conn)
        engine.create(conn, SCHEMA_VERSION)
        current = self._version(conn)
        if current > latest:
            raise DatabaseError(
                f"{engine.where}: schema version {current} is newer than this edge-fleet's"
                f" {latest}: upgrade edge-fleet"
            )
        for number, step in enumerate(MIGRATIONS[current:], start=current + 1):
            for item in step:
                engine.create(conn, item)
            conn.execute(
                engine.sql("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)"),
                (number, time.time()),
            )
        conn.execute("COMMIT")

    def _version(self, conn: Any) -> int:
        return int(
            conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        )

    def _abandon(self, conn: Any) -> None:
        """After an error: roll back, or forget a connection beyond saving."""
        engine = self._engine
        if not engine.broken(conn):
            try:
                engine.rollback(conn)
                return
            except engine.errors:
                pass
        if conn is self._conn:
            self._conn = None
        with contextlib.suppress(*engine.errors):
            conn.close()

    def _error(self, e: BaseException) -> DatabaseError:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, self._engine.unavailable):
            return DatabaseUnavailable(f"{self._engine.where} is unavailable: {detail}")
        return DatabaseError(f"{self._engine.where}: {detail}")


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def open_database(url: str, *, create: bool = True) -> Database:
    """Open and migrate ``sqlite:///PATH`` or ``postgresql://...``.

    UsageError for a URL of neither kind, a PostgreSQL URL without psycopg installed,
    or (``create=False``, for readers) a SQLite file that does not exist;
    DatabaseUnavailable when the database cannot be reached.
    """
    return Database(engine_for(url, create=create))
