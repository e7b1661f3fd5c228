"""The collector's database schema, written once for SQLite and PostgreSQL.

Tables and indexes are declared here with four column types (``text``, ``int``,
``float``, ``json``); each engine in ``fleet/db_engines.py`` renders them (sqlite-utils
for SQLite, DDL for PostgreSQL). The schema changes only by appending a step to
``MIGRATIONS``; ``schema_version`` holds one row per applied step, so a collector opens a
database an older one made and carries it on. Times are epoch seconds (double
precision); ``stored_at`` is the collector's clock when it stored the row.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT, INT, FLOAT, JSON = "text", "int", "float", "json"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    pk: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True)
class Index:
    table: str
    columns: tuple[str, ...]
    # A partial index: only rows where this SQL condition (valid in both engines) holds.
    where: str | None = None
    suffix: str = ""

    @property
    def name(self) -> str:
        return f"{self.table}_by_{'_'.join(self.columns)}{self.suffix}"


def _table(
    name: str, pk: tuple[str, ...], *columns: tuple[str, str] | tuple[str, str, bool]
) -> Table:
    return Table(name, tuple(Column(*c) for c in columns), pk)


SCHEMA_VERSION = _table(
    "schema_version", ("version",), ("version", INT, True), ("applied_at", FLOAT, True)
)

RESULTS = _table(
    "results",
    ("device", "seq"),
    ("device", TEXT, True),
    ("seq", INT, True),
    ("time", FLOAT, True),
    ("model", TEXT, True),
    ("version", TEXT, True),
    ("inputs", JSON),  # NULL when the device records no inputs
    ("outputs", JSON),
    ("prediction", JSON),  # outputs -> 'prediction', NULL when absent
    ("latency_ms", FLOAT),
    ("request_id", TEXT),
    ("stored_at", FLOAT, True),
)

# Ground truth for an earlier result; model..total are NULL until it is joined to it.
FEEDBACK = _table(
    "feedback",
    ("device", "seq"),
    ("device", TEXT, True),
    ("seq", INT, True),
    ("time", FLOAT, True),
    ("request_id", TEXT),
    ("result_seq", INT),
    ("label", JSON, True),
    ("model", TEXT),
    ("version", TEXT),
    ("correct", INT),  # NULL when the result carries no prediction to compare with
    ("total", INT),
    ("stored_at", FLOAT, True),
)

HEALTH = _table(
    "health",
    ("device", "time"),
    ("device", TEXT, True),
    ("time", FLOAT, True),
    ("fleet", TEXT),
    ("report", JSON, True),
    ("stored_at", FLOAT, True),
)

# digest: sha256 of the payload as received, so a redelivered event is stored once.
EVENTS = _table(
    "events",
    ("device", "digest"),
    ("device", TEXT, True),
    ("time", FLOAT, True),
    ("event", TEXT, True),
    ("model", TEXT),
    ("version", TEXT),
    ("serial", INT),
    ("reason", TEXT),
    ("payload", JSON, True),
    ("digest", TEXT, True),
    ("stored_at", FLOAT, True),
)

STATUS = _table(
    "status",
    ("device", "since", "state"),
    ("device", TEXT, True),
    ("since", FLOAT, True),
    ("state", TEXT, True),
    ("fleet", TEXT),
    ("payload", JSON, True),
    ("stored_at", FLOAT, True),
)

# One row per device, upserted with every batch: what the exporter reads instead of
# counting the results table. results_stored counts rows inserted, not duplicates.
DEVICES = _table(
    "devices",
    ("device",),
    ("device", TEXT, True),
    ("fleet", TEXT),
    ("results_stored", INT, True),
    ("last_seq", INT),  # newest seq stored, result or feedback
    ("last_time", FLOAT),  # its time on the device
    ("last_stored_at", FLOAT),
    ("last_delay_s", FLOAT),  # last_stored_at - last_time when it was stored
)

TABLES = (RESULTS, FEEDBACK, HEALTH, EVENTS, STATUS, DEVICES)

# --- migrations: append only; schema_version has one row per applied step ---------------

Step = tuple[Table | Index, ...]

MIGRATIONS: list[Step] = [
    (
        *TABLES,
        Index("results", ("model", "version", "time")),
        Index("results", ("time",)),
        # Partial: most results carry no request id, and their inserts skip this index.
        # A lookup `request_id = ?` implies IS NOT NULL, so both planners use it; seq
        # makes it cover the feedback join's max(seq), which SQLite's planner (no
        # ANALYZE statistics) otherwise answers by scanning the device's primary key.
        Index("results", ("device", "request_id", "seq"), where="request_id IS NOT NULL"),
        # A device's unjoined feedback, retried with each store(), without a scan.
        Index("feedback", ("device",), where="total IS NULL", suffix="_unjoined"),
        Index("feedback", ("time",)),
        Index("health", ("time",)),
        Index("events", ("time",)),
    ),
]


# --- staging: PostgreSQL loads a store()'s results with COPY into a per-connection
# temporary table and moves them with one INSERT ... SELECT ... ON CONFLICT DO NOTHING.

STAGED_RESULTS = Table(
    "staged_results", tuple(c for c in RESULTS.columns if c.name != "stored_at"), ()
)
