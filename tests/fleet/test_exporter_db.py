"""`edge-fleet exporter --db`: the collector's figures from its database, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from fleet.db import open_database
from fleet.exporter import FleetCollector
from fleet.exporter_db import CollectorFigures
from fleet.state import FleetState
from tests.fixtures.broker import Broker
from tests.fixtures.collected import result, store, stored_fleet
from tests.fixtures.postgres import Postgres
from tests.fleet.test_exporter import DASHBOARD, Samples, exporter, parse, scrape_until, value
from tests.fleet.test_status import broker_args, health_payload, publish, status_payload

ROOT = Path(__file__).resolve().parents[2]


def scrape_with(figures: CollectorFigures, fleet: FleetState | None = None) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet or FleetState(), figures=figures))
    return parse(generate_latest(registry).decode())


def test_collector_figures_come_from_the_database(db_url: str) -> None:
    now = time.time()
    stored_fleet(db_url, now)
    db = open_database(db_url)
    summary = {row["device"]: row for row in db.device_summary()}
    db.close()
    figures = CollectorFigures(db_url, interval=0)
    s = scrape_with(figures)
    figures.close()
    one, two = {"device": "pi-1", "fleet": ""}, {"device": "pi-2", "fleet": ""}
    assert value(s, "edge_collector_database_up") == 1.0
    assert value(s, "edge_collector_results_stored_total", **one) == 3
    assert value(s, "edge_collector_results_stored_total", **two) == 1
    # The newest batch of pi-1 is its feedback; of pi-2 a result answered 3 s before "now".
    assert value(s, "edge_collector_delay_seconds", **two) == pytest.approx(
        summary["pi-2"]["last_delay_s"]
    )
    assert 3.0 <= (value(s, "edge_collector_delay_seconds", **two) or 0) < 60
    age = value(s, "edge_collector_last_stored_age_seconds", **one)
    assert age is not None and 0 <= age < 60
    v1 = {"model": "iris", "version": "1.0.0"}
    assert value(s, "edge_model_labelled_total", **v1) == 3
    assert value(s, "edge_model_correct_total", **v1) == 2
    assert value(s, "edge_model_accuracy", **v1) == pytest.approx(2 / 3)
    assert value(s, "edge_model_accuracy", model="iris", version="2.0.0") is None  # no labels


def test_the_database_is_read_at_most_once_per_interval(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'collect.db'}"
    now = time.time()
    stored_fleet(url, now)
    clock = [100.0]
    figures = CollectorFigures(url, interval=5.0, monotonic=lambda: clock[0])
    one = {"device": "pi-2", "fleet": ""}
    assert value(scrape_with(figures), "edge_collector_results_stored_total", **one) == 1
    db = open_database(url)
    store(db, "pi-2", [result(2, now, 1, version="2.0.0")])
    db.close()
    clock[0] += 4.9  # a second scrape within the interval: the cached reading
    assert value(scrape_with(figures), "edge_collector_results_stored_total", **one) == 1
    clock[0] += 0.2
    assert value(scrape_with(figures), "edge_collector_results_stored_total", **one) == 2
    figures.close()


def test_a_database_that_is_down_leaves_the_mqtt_figures(postgres: Postgres, pg_url: str) -> None:
    stored_fleet(pg_url, time.time())
    fleet = FleetState()
    fleet.apply("edge/devices/pi-1/status", json.dumps(status_payload("pi-1", "north")).encode(),
                retained=True)  # fmt: skip
    figures = CollectorFigures(pg_url, interval=0)
    figures.open()
    assert value(scrape_with(figures, fleet), "edge_collector_database_up") == 1.0
    postgres.stop()
    try:
        started = time.monotonic()
        s = scrape_with(figures, fleet)
        assert time.monotonic() - started < 10  # the scrape still answers, promptly
        assert value(s, "edge_collector_database_up") == 0.0
        assert value(s, "edge_fleet_device_online", device="pi-1", fleet="north") == 1.0
        # No stale collector figures that would look live.
        assert not [name for name, _ in s if name.startswith("edge_collector_results")]
    finally:
        postgres.start()
    s = scrape_with(figures, fleet)  # back: the exporter reconnects by itself
    assert value(s, "edge_collector_database_up") == 1.0
    assert value(s, "edge_collector_results_stored_total", device="pi-1", fleet="") == 3
    figures.close()


# --- the exporter process ------------------------------------------------------------------


def test_exporter_serves_mqtt_and_database_figures(broker: Broker, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'collect.db'}"
    stored_fleet(url, time.time())
    client = broker.client()
    publish(client, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    reader = broker.add_reader("exporter")  # read-only is all it needs
    with exporter(broker, "--db", url, "--db-interval", "1", creds=reader) as (_, metrics):
        online = {"device": "pi-1", "fleet": "north"}
        scrape_until(metrics, lambda s: value(s, "edge_fleet_device_online", **online) == 1.0)
        publish(client, "edge/devices/pi-1/health", health_payload("pi-1", "north", rows=4))
        s = scrape_until(
            metrics, lambda s: value(s, "edge_fleet_buffer_rows", device="pi-1", fleet="north") == 4
        )
        assert value(s, "edge_collector_database_up") == 1.0
        assert value(s, "edge_collector_results_stored_total", device="pi-1", fleet="") == 3


@pytest.mark.parametrize("url", ["mysql://db/x", "sqlite:///nowhere/collect.db"])
def test_exporter_refuses_a_database_url_it_cannot_use(broker: Broker, url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleet", "exporter", "--listen", "127.0.0.1:0",
         "--db", url, *broker_args(broker)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert url.removeprefix("sqlite://") in done.stderr and "Traceback" not in done.stderr
    assert not (ROOT / "nowhere").exists()  # a reader never creates a database


# --- the dashboard's PostgreSQL panel against the real schema -------------------------------


def grafana_sql(raw: str) -> str:
    """The panel's SQL with Grafana's macros expanded the way its PostgreSQL plugin does."""
    sql = re.sub(
        r"\$__timeGroupAlias\((.+?), '(\d+)m'\)",
        lambda m: f'floor(extract(epoch from {m[1]})/{int(m[2]) * 60})*{int(m[2]) * 60} AS "time"',
        raw,
    )
    sql = re.sub(r"\$__unixEpochFilter\((\w+)\)", r"\1 BETWEEN 0 AND 4102444800", sql)
    return sql.replace("${device:regex}", ".*")


def test_the_postgresql_panel_runs_on_the_collectors_database(
    postgres: Postgres, pg_url: str
) -> None:
    stored_fleet(pg_url, time.time())
    doc = json.loads(DASHBOARD.read_text())
    sqls = [t["rawSql"] for p in doc["panels"] for t in p.get("targets", []) if "rawSql" in t]
    assert sqls, "the dashboard has no PostgreSQL panel"
    database = pg_url.rsplit("/", 1)[1]
    for raw in sqls:
        rows = postgres.sql(grafana_sql(raw), database=database)
        per_version: dict[object, int] = {}
        for _minute, metric, count in rows:  # the rows may fall into two minutes
            per_version[metric] = per_version.get(metric, 0) + int(str(count))
        assert per_version == {"iris 1.0.0": 3, "iris 2.0.0": 1}


def test_a_read_only_postgresql_role_is_enough(postgres: Postgres, pg_url: str) -> None:
    stored_fleet(pg_url, time.time())  # the collector made the schema
    database = pg_url.rsplit("/", 1)[1]
    postgres.sql("CREATE ROLE grafana_reader LOGIN")
    try:
        postgres.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader", database)
        reader_url = pg_url.replace("postgres@", "grafana_reader@", 1)
        figures = CollectorFigures(reader_url, interval=0)
        figures.open()
        s = scrape_with(figures)
        figures.close()
        assert value(s, "edge_collector_database_up") == 1.0
        assert value(s, "edge_collector_results_stored_total", device="pi-1", fleet="") == 3
        assert value(s, "edge_model_accuracy", model="iris", version="1.0.0") == pytest.approx(
            2 / 3
        )
    finally:
        postgres.sql("DROP OWNED BY grafana_reader CASCADE", database)
        postgres.sql("DROP ROLE grafana_reader")
