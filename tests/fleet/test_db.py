"""fleet.db on both engines: a SQLite file and a real PostgreSQL (tests/fixtures/postgres.py)."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.wire import payloads
from agent.wire.errors import UsageError
from fleet import db_schema
from fleet.db import Batch, Database, DatabaseError, DatabaseUnavailable, open_database
from fleet.db_batch import score
from fleet.db_engines import engine_for
from tests.fixtures.postgres import Postgres, free_port
from tests.fleet.db_rows import T0, feedback, result, rows, store


@pytest.fixture
def db(db_url: str) -> Any:
    database = open_database(db_url)
    yield database
    database.close()


def count(db: Database, table: str) -> int:
    return int(db._read(f"SELECT count(*) FROM {table}", [])[0][0])


# --- schema -------------------------------------------------------------------------


def test_open_creates_the_schema_once(db_url: str) -> None:
    first = open_database(db_url)
    first.close()
    again = open_database(db_url)
    try:
        versions = again._read("SELECT version FROM schema_version ORDER BY version", [])
        assert [v for (v,) in versions] == list(range(1, len(db_schema.MIGRATIONS) + 1))
        for table in db_schema.TABLES:
            assert count(again, table.name) == 0
    finally:
        again.close()


def test_a_new_migration_step_is_applied_to_an_existing_database(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = open_database(db_url)
    store(old, "pi-1", result(1))
    old.close()
    step = (db_schema.Index("results", ("model",)),)
    monkeypatch.setattr(db_schema, "MIGRATIONS", [*db_schema.MIGRATIONS, step])
    monkeypatch.setattr("fleet.db.MIGRATIONS", db_schema.MIGRATIONS)
    upgraded = open_database(db_url)
    try:
        assert upgraded._read("SELECT max(version) FROM schema_version", [])[0][0] == 2
        assert [r["seq"] for r in upgraded.query_results(model="iris")] == [1]
    finally:
        upgraded.close()


def test_a_database_from_a_newer_edge_fleet_is_refused(db_url: str) -> None:
    db = open_database(db_url)
    db._read("SELECT 1", [])
    conn = db._conn
    conn.execute(
        db._engine.sql("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)"), (99, 0.0)
    )
    db.close()
    with pytest.raises(DatabaseError, match="schema version 99 is newer"):
        open_database(db_url)


# --- results ------------------------------------------------------------------------


def test_results_are_stored_with_every_column(db: Database) -> None:
    report = store(db, "pi-1", result(1, request_id="req-1"), result(2, prediction=[0, 1]))
    assert (report.inserted, report.duplicates, report.per_device) == (2, 0, {"pi-1": 2})
    first, second = db.query_results()
    assert first["device"] == "pi-1" and first["seq"] == 1 and first["time"] == T0 + 1
    assert (first["model"], first["version"], first["request_id"]) == ("iris", "1.0.0", "req-1")
    assert first["inputs"] == [[5.1, 3.5, 1.4, 0.2]]
    assert first["outputs"] == {"prediction": [1], "probabilities": [[0.9, 0.1]]}
    assert first["prediction"] == [1] and second["prediction"] == [0, 1]
    assert first["latency_ms"] == 0.25
    assert abs(first["stored_at"] - time.time()) < 60


def test_a_duplicate_delivery_is_stored_once(db: Database) -> None:
    message = rows("pi-1", result(1), result(2), result(3))
    batch = Batch()
    assert batch.add_results("pi-1", message) == (1, 3)
    assert batch.add_results("pi-1", message) == (1, 3)  # the same message twice in one batch
    report = db.store(batch)
    assert (report.inserted, report.duplicates) == (3, 3)
    again = Batch()
    again.add_results("pi-1", message)
    report = db.store(again)  # a redelivery after the ack was lost
    assert (report.inserted, report.duplicates, report.per_device) == (0, 3, {"pi-1": 0})
    assert count(db, "results") == 3
    (summary,) = db.device_summary()
    assert summary["results_stored"] == 3 and summary["last_seq"] == 3


def test_the_devices_summary_follows_the_newest_row(db: Database) -> None:
    batch = Batch()
    batch.add_results("pi-1", rows("pi-1", result(5), result(6)))
    batch.add_results("pi-2", rows("pi-2", result(1)))
    batch.add_health("pi-1", payloads.health("pi-1", "north", {}, t=T0))
    db.store(batch)
    store(db, "pi-1", result(3))  # an older row arriving late moves nothing back
    one, two = db.device_summary()
    assert (one["device"], one["fleet"], one["results_stored"], one["last_seq"]) == (
        "pi-1",
        "north",
        3,
        6,
    )
    assert one["last_time"] == T0 + 6
    assert one["last_delay_s"] == pytest.approx(one["last_stored_at"] - (T0 + 6), abs=1)
    assert (two["device"], two["fleet"], two["results_stored"]) == ("pi-2", None, 1)


def test_health_events_and_status_are_stored_once(db: Database) -> None:
    health = payloads.health("pi-1", "north", {"cpu_percent": 12.5}, t=T0)
    event = payloads.event(
        "pi-1", payloads.ACTIVATED, t=T0, model="iris", version="1.0.0", serial=7
    )
    status = payloads.status("pi-1", "north", "online", {}, t=T0)
    for _ in range(2):  # the second time: a redelivery, a retained status sent again
        batch = Batch()
        batch.add_health("pi-1", health)
        batch.add_event("pi-1", event, payloads.encode(event))
        batch.add_status("pi-1", status)
        assert len(batch) == 3
        db.store(batch)
    assert [count(db, t) for t in ("health", "events", "status")] == [1, 1, 1]
    (row,) = db._read("SELECT device, time, event, model, version, serial, payload FROM events", [])
    assert row[:6] == ("pi-1", T0, "activated", "iris", "1.0.0", 7)
    assert json.loads(row[6]) == event
    ((fleet, report),) = db._read("SELECT fleet, report FROM health", [])
    assert fleet == "north" and json.loads(report)["cpu_percent"] == 12.5


def test_values_a_database_would_refuse_are_stored_repaired(db: Database) -> None:
    odd = {
        "seq": 1, "time": T0, "model": "iris\x00", "version": "1\ud800", "inputs": [[float("nan"), 1.0]],
        "outputs": {"prediction": ["caf\u00e9\x00"], "note": "\ud83d"}, "latency_ms": "slow",
    }  # fmt: skip
    batch = Batch()
    batch.add_results("pi-1", [odd])
    assert db.store(batch).inserted == 1
    (row,) = db.query_results()
    assert (row["model"], row["version"]) == ("iris\ufffd", "1\ufffd")
    assert row["inputs"] == [[None, 1.0]] and row["latency_ms"] is None
    assert row["prediction"] == ["caf\u00e9\x00"]


def test_a_seq_past_bigint_is_refused_and_leaves_nothing_in_the_batch() -> None:
    batch = Batch()
    message = [json.loads(result(1)), {**json.loads(result(2)), "seq": 2**63}]
    with pytest.raises(payloads.InvalidPayload, match="seq"):
        batch.add_results("pi-1", message)
    assert len(batch) == 0 and not batch.results.get("pi-1")


# --- feedback and accuracy ---------------------------------------------------------


def test_feedback_is_joined_to_a_result_stored_before(db: Database) -> None:
    store(db, "pi-1", result(1, request_id="a", prediction=[1]), result(2, prediction=[0, 1, 2]))
    report = store(db, "pi-1", feedback(3, 1, request_id="a"), feedback(4, [0, 1, 0], result_seq=2))
    assert (report.feedback, report.joined) == (2, 2)
    joined = db._read("SELECT seq, model, version, correct, total FROM feedback ORDER BY seq", [])
    assert joined == [(3, "iris", "1.0.0", 1, 1), (4, "iris", "1.0.0", 2, 3)]


def test_feedback_waits_for_its_result_and_is_joined_when_it_arrives(db: Database) -> None:
    report = store(db, "pi-1", feedback(2, "1", request_id="late"))
    assert (report.feedback, report.joined) == (1, 0)
    assert db._read("SELECT model, correct, total FROM feedback", []) == [(None, None, None)]
    store(db, "pi-2", result(1, request_id="late"))  # another device's result is not it
    assert db._read("SELECT total FROM feedback", []) == [(None,)]
    report = store(db, "pi-1", result(1, request_id="late", prediction=[1]))
    assert report.joined == 1
    assert db._read("SELECT model, correct, total FROM feedback", []) == [("iris", 1, 1)]


def test_feedback_by_request_id_takes_the_newest_result_with_it(db: Database) -> None:
    store(
        db,
        "pi-1",
        result(1, request_id="r", prediction=[0]),
        result(2, request_id="r", prediction=[1]),
    )
    store(db, "pi-1", feedback(3, 1, request_id="r"))
    assert db._read("SELECT correct, total FROM feedback", []) == [(1, 1)]


def test_accuracy_per_model_version(db: Database) -> None:
    store(
        db, "pi-1",
        result(1, prediction=[1], version="1.0.0"), result(2, prediction=[0], version="1.0.0"),
        result(3, prediction=[2, 2], version="2.0.0", t=T0 + 1000),
        feedback(4, 1, result_seq=1), feedback(5, 1, result_seq=2), feedback(6, [2, 2], result_seq=3),
        feedback(7, 1, result_seq=99),  # its result never arrived: not counted
    )  # fmt: skip
    assert db.accuracy() == [
        {"model": "iris", "version": "1.0.0", "feedback": 2, "labelled": 2, "correct": 1, "accuracy": 0.5},
        {"model": "iris", "version": "2.0.0", "feedback": 1, "labelled": 2, "correct": 2, "accuracy": 1.0},
    ]  # fmt: skip
    assert [a["version"] for a in db.accuracy(since=T0 + 6)] == ["2.0.0"]


def test_score_compares_labels_row_by_row() -> None:
    assert score(1, [1]) == (1, 1)
    assert score("1", [1]) == (1, 1)  # posted as text, predicted as a number
    assert score("cat", ["dog"]) == (0, 1)
    assert score([1, 0, 1], [1, 1, 1]) == (2, 3)
    assert score([1, 0], None) == (None, 2)  # no prediction to compare with


# --- queries ------------------------------------------------------------------------


def test_query_filters_and_limit(db: Database) -> None:
    store(db, "pi-1", result(1), result(2, version="2.0.0"), result(3, model="wine"))
    store(db, "pi-2", result(1, t=T0 + 1.5), result(2, t=T0 + 10))

    def seqs(**filters: Any) -> list[tuple[str, int]]:
        return [(r["device"], r["seq"]) for r in db.query_results(**filters)]

    assert seqs() == [("pi-1", 1), ("pi-2", 1), ("pi-1", 2), ("pi-1", 3), ("pi-2", 2)]
    assert seqs(device="pi-2") == [("pi-2", 1), ("pi-2", 2)]
    assert seqs(model="iris", version="1.0.0") == [("pi-1", 1), ("pi-2", 1), ("pi-2", 2)]
    assert seqs(since=T0 + 2, until=T0 + 10) == [("pi-1", 2), ("pi-1", 3)]
    assert seqs(limit=2) == [("pi-1", 3), ("pi-2", 2)]  # the newest two, oldest first
    assert seqs(device="nobody") == []


# --- URLs and drivers ---------------------------------------------------------------


@pytest.mark.parametrize("url", ["mysql://db/fleet", "sqlite://", "sqlite:///:memory:", "fleet.db"])
def test_a_bad_url_is_a_usage_error(url: str) -> None:
    with pytest.raises(UsageError, match="--db"):
        open_database(url)


def test_a_reader_does_not_create_a_missing_sqlite_file(tmp_path: Any) -> None:
    with pytest.raises(UsageError, match="no such database file"):
        open_database(f"sqlite:///{tmp_path}/missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_postgresql_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(UsageError, match=r"pip install 'edge-agent\[postgres\]'"):
        open_database("postgresql://postgres:secret@127.0.0.1:1/fleet")


def test_a_password_stays_out_of_the_url_and_messages(pg_url: str, postgres: Postgres) -> None:
    url = pg_url.replace("postgres@", "postgres:s3cret@")
    db = open_database(url)
    try:
        assert "s3cret" not in db.url and db.kind == "postgresql"
    finally:
        db.close()
    with pytest.raises(DatabaseUnavailable) as caught:
        open_database(f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/x")
    assert "s3cret" not in str(caught.value)


# --- PostgreSQL down for a while -----------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_postgresql_down_fails_fast_and_store_reconnects_after(
    pg_url: str, postgres: Postgres, how: str
) -> None:
    db = open_database(pg_url)
    try:
        store(db, "pi-1", result(1))
        postgres.stop() if how == "stop" else postgres.kill()
        for seq in (2, 3):  # the broken connection, then a refused new one
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match=r"PostgreSQL .* is unavailable"):
                store(db, "pi-1", result(seq))
            assert time.monotonic() - started < 3
        postgres.start()
        report = store(db, "pi-1", result(2), result(3))
        assert report.inserted == 2
        assert [r["seq"] for r in db.query_results()] == [1, 2, 3]
    finally:
        db.close()
        if not postgres.running():
            postgres.start()


def test_postgresql_restarted_between_stores_costs_no_failure(
    pg_url: str, postgres: Postgres
) -> None:
    db = open_database(pg_url)
    try:
        store(db, "pi-1", result(1))
        postgres.stop()
        postgres.start()
        assert store(db, "pi-1", result(2)).inserted == 1  # the stale connection is replaced
        assert db.device_summary()[0]["results_stored"] == 2
    finally:
        db.close()


def test_open_while_postgresql_is_down_is_unavailable(postgres: Postgres) -> None:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match="unavailable"):
        open_database(f"postgresql://postgres@127.0.0.1:{free_port()}/fleet")
    assert time.monotonic() - started < 3


def test_sqlite_locked_by_another_writer_is_unavailable_then_stores(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fleet.db"
    open_database(url).close()
    engine = engine_for(url)
    engine.busy_timeout_s = 0.2  # type: ignore[attr-defined]
    db = Database(engine)
    other = sqlite3.connect(tmp_path / "fleet.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(
            DatabaseUnavailable, match=r"SQLite database .* is unavailable: database is locked"
        ):
            store(db, "pi-1", result(1))
        other.execute("ROLLBACK")
        assert store(db, "pi-1", result(1)).inserted == 1
    finally:
        other.close()
        db.close()


@pytest.mark.parametrize(
    "value",
    [
        [[5.1, 3.5, 1.4, 0.2]],
        {"prediction": ["setosa"], "probabilities": [[0.98, 0.02, 1e-300]]},
        ["Oslo", "åäö", "日本"],
        [float("nan"), float("inf"), -0.0],
        "a\ud800b",  # a lone surrogate: orjson refuses it, the standard encoder takes it
        [2**70],  # past 64 bits: the same
        {"nested": {"a": [True, None, 3]}},
    ],
)
def test_json_text_is_the_same_value_with_or_without_orjson(
    value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet import db_batch

    fast = db_batch.json_text(value)
    monkeypatch.setattr(db_batch, "orjson", None)
    plain = db_batch.json_text(value)
    assert fast is not None and plain is not None
    assert json.loads(fast) == json.loads(plain)
    assert "NaN" not in fast and "Infinity" not in fast  # JSON has no such numbers
