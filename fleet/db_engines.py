"""The two database engines behind ``fleet.db``: what differs between SQLite and PostgreSQL.

Everything else (the schema, the migrations, every statement but one) is shared. What
an engine adds: how to connect, the paramstyle, how a table of ``fleet/db_schema.py`` is
created (sqlite-utils, or DDL), which errors mean "the database is down", and the one
statement that differs, the bulk insert of results. Chosen by measuring on the 2-core
build machine (``bench/db_store.py``: rows of 4 float inputs and ``{"prediction":
[1]}``, 5 messages of 1000 rows per store(), into tables growing to 300,000 rows):

- SQLite: ``executemany`` of ``INSERT ... ON CONFLICT DO NOTHING``, one per device so
  its ``rowcount`` is that device's inserted count: store() 78,000 rows/s (WAL,
  synchronous=NORMAL). Loading a temporary table and one ``INSERT ... SELECT`` was no
  faster, and reading rows out of the payload text with SQLite 3.40's JSON functions
  cost ~16 us a row, more than Python's encoding (``Batch``, ~9 us).
- PostgreSQL: ``COPY`` (binary) into a temporary table, then one ``INSERT ... SELECT
  ... ON CONFLICT DO NOTHING``: store() 42,700 rows/s (fsync and synchronous_commit
  on). executemany (pipelined by psycopg 3) and ``INSERT ... SELECT FROM unnest(arrays)``
  both ran at ~17,000 rows/s with COPY at ~30,000 in the same run. JSON columns are
  ``json``, not ``jsonb``: ~20% faster to store (COPY 37,000 against 30,000 rows/s in
  the first comparison), the text stays as the device sent it, and it accepts what
  jsonb refuses (``\\u0000``, a lone surrogate escape), so one odd payload cannot wedge
  the collector's transaction. ``->``/``->>`` work on json as on jsonb.

A store() of rows stored already (a redelivery) runs at 138,000 (SQLite) and 116,000
(PostgreSQL) rows/s.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.wire.errors import UsageError

from fleet.db_schema import FLOAT, INT, JSON, RESULTS, STAGED_RESULTS, TEXT, Index, Table

# sqlite-utils imports pandas whenever it is installed, for DataFrame support never used
# here (seconds of start-up for `edge-fleet results`). Hide it for that one import only.
_pandas_loaded = "pandas" in sys.modules
if not _pandas_loaded:
    sys.modules["pandas"] = None  # type: ignore[assignment]
try:
    import sqlite_utils
finally:
    if not _pandas_loaded:
        del sys.modules["pandas"]

POSTGRES_EXTRA = "pip install 'edge-agent[postgres]'"
CONNECT_TIMEOUT_S = 2
# A lost server (cable pulled, host frozen) shows within this time instead of a write
# that blocks forever: libpq's tcp_user_timeout, milliseconds.
TCP_USER_TIMEOUT_MS = 10_000
# pg_advisory_xact_lock key: collectors opening one database at once migrate it in turn.
_SCHEMA_LOCK = 0x6564676566_6C74  # "edgeflt"

RESULT_COLUMNS = ", ".join(STAGED_RESULTS.names)
# Counted in the server: fetching a RETURNING row per result cost 3 us a row. No ORDER BY
# (4 us a row): COPY writes the rows in primary key order and a fresh temporary heap
# reads back in that order, so two collectors inserting overlapping rows (a
# redelivery) take their locks in the same order; if they ever did not, PostgreSQL's
# deadlock detection fails one store(), which is retried like any unavailability.
_MOVE_STAGED = (
    f"WITH inserted AS (INSERT INTO results ({RESULT_COLUMNS}, stored_at)"
    f" SELECT {RESULT_COLUMNS}, %s FROM staged_results"
    " ON CONFLICT (device, seq) DO NOTHING RETURNING device)"
    " SELECT device, count(*) FROM inserted GROUP BY device"
)
_INSERT_RESULTS = (
    f"INSERT INTO results ({RESULT_COLUMNS}, stored_at)"
    f" VALUES ({', '.join('?' * len(RESULTS.columns))})"
    " ON CONFLICT (device, seq) DO NOTHING"
)

Rows = Sequence[tuple[Any, ...]]
_seq = itemgetter(1)


class Engine:
    """What one kind of database needs; ``fleet.db.Database`` holds one."""

    kind: str
    begin = "BEGIN"
    # Errors meaning "down, try again later", and every error of the driver.
    unavailable: tuple[type[BaseException], ...] = ()
    errors: tuple[type[BaseException], ...] = ()
    json_type = "TEXT"

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = url

    def connect(self, *, writer: bool) -> Any:
        """A new DB-API connection in autocommit mode (transactions are explicit)."""
        raise NotImplementedError

    def sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders in this driver's paramstyle."""
        return text

    def create(self, conn: Any, item: Table | Index) -> None:
        raise NotImplementedError

    def lock_schema(self, conn: Any) -> None:
        """Inside the migration's transaction: keep other collectors out until it ends."""

    def has_table(self, conn: Any, name: str) -> bool:
        raise NotImplementedError

    def rollback(self, conn: Any) -> None:
        conn.execute("ROLLBACK")  # PostgreSQL only warns when no transaction is open

    def insert_results(self, conn: Any, rows: Mapping[str, Rows], now: float) -> dict[str, int]:
        """Insert each device's result rows (``STAGED_RESULTS`` columns), skipping those
        stored already; returns the rows inserted per device."""
        raise NotImplementedError

    def broken(self, conn: Any) -> bool:
        """Whether ``conn`` is beyond use after an error (reconnect instead)."""
        return False

    def stream(self, conn: Any, sql: str, params: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
        """The rows of a query, fetched a chunk at a time."""
        yield from conn.execute(self.sql(sql), params)


# --- SQLite ---------------------------------------------------------------------------


class SQLite(Engine):
    kind = "sqlite"
    begin = "BEGIN IMMEDIATE"  # take the write lock now, not on the first write
    unavailable = (sqlite3.OperationalError,)  # locked, disk full, I/O error, read-only
    errors = (sqlite3.Error,)
    # How long a writer waits for another (a second collector on the same file).
    busy_timeout_s = 10.0

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url)
        self.path = path
        self.where = f"SQLite database {path}"

    def connect(self, *, writer: bool) -> Any:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout_s
        )
        if writer:
            sqlite_utils.Database(conn, execute_plugins=False).enable_wal()
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, safe
        return conn

    def create(self, conn: Any, item: Table | Index) -> None:
        db = sqlite_utils.Database(conn, execute_plugins=False)
        if isinstance(item, Table):
            types = {TEXT: str, INT: int, FLOAT: float, JSON: str}
            db.table(item.name).create(
                {c.name: types[c.type] for c in item.columns},
                pk=item.pk[0] if len(item.pk) == 1 else item.pk,
                not_null={c.name for c in item.columns if c.not_null},
                if_not_exists=True,
            )
        elif item.where is None:
            db.table(item.table).create_index(
                list(item.columns), index_name=item.name, if_not_exists=True
            )
        else:  # sqlite-utils makes no partial indexes
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {item.name} ON {item.table}"
                f" ({', '.join(item.columns)}) WHERE {item.where}"
            )

    def has_table(self, conn: Any, name: str) -> bool:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return found is not None

    def rollback(self, conn: Any) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def insert_results(self, conn: Any, rows: Mapping[str, Rows], now: float) -> dict[str, int]:
        inserted = {}
        tail = (now,)
        for device, device_rows in rows.items():
            cursor = conn.executemany(_INSERT_RESULTS, [r + tail for r in device_rows])
            inserted[device] = max(0, cursor.rowcount)
        return inserted


def sqlite_engine(url: str, *, create: bool) -> SQLite:
    path_text = url[len("sqlite:///") :] if url[:10].lower() == "sqlite:///" else ""
    if not path_text or path_text == ":memory:" or "?" in path_text:
        raise UsageError(
            f"--db {url!r}: expected sqlite:///relative/path or sqlite:////absolute/path"
        )
    path = Path(path_text).expanduser()
    if not create and not path.is_file():
        raise UsageError(f"--db {url!r}: no such database file {path}")
    if sqlite3.sqlite_version_info < (3, 35):  # ON CONFLICT DO NOTHING RETURNING, upserts
        raise UsageError(f"--db {url!r}: SQLite {sqlite3.sqlite_version} is older than 3.35")
    return SQLite(url, path)


# --- PostgreSQL -----------------------------------------------------------------------


class PostgreSQL(Engine):
    kind = "postgresql"
    json_type = "json"
    _types = {TEXT: "text", INT: "bigint", FLOAT: "double precision", JSON: "json"}

    def __init__(self, url: str, psycopg: Any) -> None:
        super().__init__(url)
        self.psycopg = psycopg
        self.unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
        self.errors = (psycopg.Error,)
        self.where = f"PostgreSQL {redact(url)}"
        self._sql: dict[str, str] = {}
        self._sql_lock = threading.Lock()
        # JSON columns travel as text: it is JSON already, and json's binary form is its
        # text (psycopg's json dumper would encode the string once more).
        self._copy_types = [
            "text" if c.type == JSON else self._types[c.type] for c in STAGED_RESULTS.columns
        ]

    def connect(self, *, writer: bool) -> Any:
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.types.string import TextLoader

        options: dict[str, Any] = {"application_name": "edge-fleet"}
        given = conninfo_to_dict(self.url)
        options.setdefault("connect_timeout", given.get("connect_timeout", CONNECT_TIMEOUT_S))
        options.setdefault("tcp_user_timeout", given.get("tcp_user_timeout", TCP_USER_TIMEOUT_MS))
        conn = self.psycopg.connect(self.url, autocommit=True, **options)
        # JSON columns come back as their text; fleet.db decodes them the same way for
        # both engines, and parsing twice would cost the CLI's exports.
        for name in ("json", "jsonb"):
            conn.adapters.register_loader(name, TextLoader)
        if writer:
            columns = ", ".join(f"{c.name} {self._types[c.type]}" for c in STAGED_RESULTS.columns)
            conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS staged_results ({columns}) ON COMMIT DELETE ROWS"
            )
        return conn

    def sql(self, text: str) -> str:
        # Statements are written once with ?; none has a literal ? or %.
        converted = self._sql.get(text)
        if converted is None:
            converted = text.replace("?", "%s")
            with self._sql_lock:
                self._sql[text] = converted
        return converted

    def create(self, conn: Any, item: Table | Index) -> None:
        if isinstance(item, Table):
            columns = [
                f"{c.name} {self._types[c.type]}{' NOT NULL' if c.not_null else ''}"
                for c in item.columns
            ]
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {item.name}"
                f" ({', '.join(columns)}, PRIMARY KEY ({', '.join(item.pk)}))"
            )
        else:
            where = f" WHERE {item.where}" if item.where else ""
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {item.name} ON {item.table}"
                f" ({', '.join(item.columns)}){where}"
            )

    def lock_schema(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))

    def has_table(self, conn: Any, name: str) -> bool:
        return bool(conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0])

    def insert_results(self, conn: Any, rows: Mapping[str, Rows], now: float) -> dict[str, int]:
        cursor = conn.cursor()
        with cursor.copy(
            f"COPY staged_results ({RESULT_COLUMNS}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(self._copy_types)
            for device in sorted(rows):
                # Sorting rows in seq order already (the usual case) is one pass.
                for row in sorted(rows[device], key=_seq):
                    copy.write_row(row)
        cursor.execute(_MOVE_STAGED, (now,))
        inserted = {device: int(n) for device, n in cursor.fetchall()}
        return {device: inserted.get(device, 0) for device in rows}

    def broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def stream(self, conn: Any, sql: str, params: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
        # A server-side cursor: an export of millions of rows never sits in memory whole.
        with conn.transaction(), conn.cursor(name="edge_fleet_query") as cursor:
            cursor.itersize = 2000
            cursor.execute(self.sql(sql), params)
            yield from cursor


def postgres_engine(url: str) -> PostgreSQL:
    try:
        import psycopg
    except ImportError:
        raise UsageError(
            f"--db {redact(url)!r}: PostgreSQL needs psycopg 3: {POSTGRES_EXTRA}"
        ) from None
    return PostgreSQL(url, psycopg)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def engine_for(url: str, *, create: bool = True) -> Engine:
    """The engine for ``sqlite:///PATH`` or ``postgresql://...``, or UsageError."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return sqlite_engine(url, create=create)
    if scheme in ("postgresql", "postgres"):
        return postgres_engine(url)
    raise UsageError(
        f"--db {redact(url)!r}: expected sqlite:///PATH or postgresql://[user@]host[:port]/database"
    )
