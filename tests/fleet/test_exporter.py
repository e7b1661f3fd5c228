"""`edge-fleet exporter`: metrics from status and health, shared subscriptions, Grafana, Prometheus."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.wire import payloads
from fleet.exporter import FleetCollector
from fleet.state import FleetState
from tests.fixtures.broker import Broker, Creds
from tests.fixtures.prometheus import needs_prometheus, running_prometheus
from tests.fleet.test_status import broker_args, health_payload, publish, status_payload

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_collector(fleet: FleetState, now: float) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, clock=lambda: now))
    return parse(generate_latest(registry).decode())


def msg(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


# --- the collector over the fleet state (no socket) ------------------------------------


def test_collector_labels_every_series_by_device_and_fleet() -> None:
    fleet = FleetState()
    fleet.apply("edge/devices/pi-1/status", msg(status_payload("pi-1", "north")), retained=True)
    fleet.apply("edge/devices/pi-1/health", msg(health_payload("pi-1", "north", rows=5)), now=100.0)
    fleet.apply(
        "edge/devices/pi-2/status", msg(status_payload("pi-2", "north", "offline")), retained=True
    )
    s = scrape_collector(fleet, now=104.0)
    one = {"device": "pi-1", "fleet": "north"}
    two = {"device": "pi-2", "fleet": "north"}
    assert value(s, "edge_fleet_device_online", **one) == 1.0
    assert value(s, "edge_fleet_device_online", **two) == 0.0
    assert value(s, "edge_fleet_devices", fleet="north", state="online") == 1.0
    assert value(s, "edge_fleet_devices", fleet="north", state="offline") == 1.0
    assert value(s, "edge_fleet_device_health_age_seconds", **one) == 4.0
    assert value(s, "edge_fleet_device_last_seen_age_seconds", **one) == 4.0
    assert value(s, "edge_fleet_device_last_seen_age_seconds", **two) is None  # retained only
    assert value(s, "edge_fleet_device_info", **one, agent_version="0.1.0") == 1.0
    assert value(s, "edge_fleet_device_cpu_percent", **one) == 12.5
    assert value(s, "edge_fleet_device_load_average", **one, period="5m") == 0.25
    assert value(s, "edge_fleet_device_memory_available_bytes", **one) == 600_000_000
    assert value(s, "edge_fleet_agent_rss_bytes", **one) == 80_000_000
    assert value(s, "edge_fleet_device_disk_free_bytes", **one) == 5_000_000_000
    assert value(s, "edge_fleet_device_soc_temperature_celsius", **one) == 48.3
    assert value(s, "edge_fleet_buffer_rows", **one) == 5
    assert value(s, "edge_fleet_buffer_oldest_age_seconds", **one) == 30.0
    assert value(s, "edge_fleet_buffer_dropped_total", **one, reason="disk_full") == 2
    assert value(s, "edge_fleet_mqtt_reconnects_total", **one) == 3
    assert value(s, "edge_fleet_results_forwarded_total", **one) == 42
    model = {**one, "model": "iris", "version": "1.2.0"}
    assert value(s, "edge_fleet_model_info", **model, previous="1.1.0", state="active") == 1.0
    assert value(s, "edge_fleet_model_latency_p99_seconds", **model) == 0.0045
    assert value(s, "edge_fleet_model_latency_p50_seconds", **model) == 0.00125
    # No health from pi-2: no health series at all rather than zeros that look real.
    assert value(s, "edge_fleet_device_cpu_percent", **two) is None


def test_inference_counters_sum_health_windows_once_each() -> None:
    fleet = FleetState()
    first = health_payload("pi-1", "north", inferences=10)
    fleet.apply("edge/devices/pi-1/health", msg(first), now=1.0)
    fleet.apply("edge/devices/pi-1/health", msg(first), now=1.1)  # QoS 1 redelivery
    fleet.apply(
        "edge/devices/pi-1/health", msg({**first, "time": "2026-01-01T00:00:01.000Z"}), now=2.0
    )
    upgraded = health_payload("pi-1", "north", inferences=4, model_version="1.3.0")
    fleet.apply("edge/devices/pi-1/health", msg(upgraded), now=3.0)
    s = scrape_collector(fleet, now=3.0)
    labels = {"device": "pi-1", "fleet": "north", "model": "iris"}
    assert value(s, "edge_fleet_model_inferences_total", **labels, version="1.2.0") == 20
    assert value(s, "edge_fleet_model_errors_total", **labels, version="1.2.0") == 2
    assert value(s, "edge_fleet_model_inferences_total", **labels, version="1.3.0") == 4


def test_every_drop_reason_has_a_series_from_the_first_health() -> None:
    # An agent that has dropped nothing sends `"dropped": {}`: without a series per reason
    # the dashboard's drop panel had no data, and increase() missed the first drop.
    from agent.wire.payloads import DROP_REASONS

    fleet = FleetState()
    health = health_payload("pi-1", "north")
    health["buffer"]["dropped"] = {}
    fleet.apply("edge/devices/pi-1/health", msg(health), now=1.0)
    fleet.apply("edge/devices/pi-2/health", msg(health_payload("pi-2", "north")), now=1.0)
    s = scrape_collector(fleet, now=2.0)
    for reason in DROP_REASONS:
        assert value(s, "edge_fleet_buffer_dropped_total", device="pi-1", fleet="north",
                     reason=reason) == 0.0  # fmt: skip
    two = {"device": "pi-2", "fleet": "north"}
    assert value(s, "edge_fleet_buffer_dropped_total", **two, reason="disk_full") == 2
    assert value(s, "edge_fleet_buffer_dropped_total", **two, reason="max_rows") == 0
    # A reason a newer agent adds is served as it comes.
    health["buffer"]["dropped"] = {"max_rows": 1, "cosmic_ray": 4}
    fleet.apply("edge/devices/pi-1/health", msg({**health, "time": "2026-01-02T00:00:00.000Z"}))
    s = scrape_collector(fleet, now=3.0)
    one = {"device": "pi-1", "fleet": "north"}
    assert value(s, "edge_fleet_buffer_dropped_total", **one, reason="cosmic_ray") == 4
    assert value(s, "edge_fleet_buffer_dropped_total", **one, reason="max_rows") == 1
    # No health yet: no drop series (zeros would claim a report that never came).
    fleet.apply("edge/devices/pi-3/status", msg(status_payload("pi-3", "north")), retained=True)
    s = scrape_collector(fleet, now=3.0)
    assert not [k for k in s if k[0].startswith("edge_fleet_buffer_dropped")
                and dict(k[1])["device"] == "pi-3"]  # fmt: skip


def test_bad_requests_are_counted_apart_from_model_errors() -> None:
    fleet = FleetState()
    health = health_payload("pi-1", "north", inferences=10)
    health["models"]["iris"].update(errors=1, bad_requests=30)
    fleet.apply("edge/devices/pi-1/health", msg(health), now=1.0)
    fleet.apply(
        "edge/devices/pi-1/health", msg({**health, "time": "2026-01-02T00:00:00.000Z"}), now=2.0
    )
    old = health_payload("pi-2", "north")  # an agent that does not report bad_requests
    fleet.apply("edge/devices/pi-2/health", msg(old), now=1.0)
    s = scrape_collector(fleet, now=3.0)
    labels = {"fleet": "north", "model": "iris", "version": "1.2.0"}
    assert value(s, "edge_fleet_model_bad_requests_total", device="pi-1", **labels) == 60
    assert value(s, "edge_fleet_model_errors_total", device="pi-1", **labels) == 2
    assert value(s, "edge_fleet_model_bad_requests_total", device="pi-2", **labels) == 0


def test_desired_version_and_decision_per_device() -> None:
    fleet = FleetState()
    model = {"version": "1.2.0", "previous": "1.1.0", "state": "active", "serial": 7,
             "desired": {"version": "1.3.0", "serial": 8, "source": "fleet",
                         "decision": "rejected"}}  # fmt: skip
    status = status_payload("pi-1", "north", models={"iris": model})
    fleet.apply("edge/devices/pi-1/status", msg(status), retained=True)
    s = scrape_collector(fleet, now=1.0)
    assert value(s, "edge_fleet_model_desired_info", device="pi-1", fleet="north", model="iris",
                 version="1.3.0", source="fleet", decision="rejected") == 1.0  # fmt: skip
    assert value(s, "edge_fleet_model_info", device="pi-1", fleet="north", model="iris",
                 version="1.2.0", previous="1.1.0", state="active") == 1.0  # fmt: skip


def test_missing_temperature_and_forgotten_devices_leave_no_series() -> None:
    fleet = FleetState()
    fleet.apply("edge/devices/vm-1/status", msg(status_payload("vm-1", "lab")), retained=True)
    fleet.apply(
        "edge/devices/vm-1/health", msg({**health_payload("vm-1", "lab"), "soc_temp_c": None})
    )
    s = scrape_collector(fleet, now=time.time())
    assert not any(name == "edge_fleet_device_soc_temperature_celsius" for name, _ in s)
    fleet.apply("edge/devices/vm-1/status", b"", retained=True)
    s = scrape_collector(fleet, now=time.time())
    assert not any(dict(labels).get("device") == "vm-1" for _, labels in s)


# --- the exporter process against a real broker -------------------------------------------


@contextlib.contextmanager
def exporter(
    broker: Broker, *extra: str, creds: Creds | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`edge-fleet exporter` on a free port (as ``creds``, default the operator); yields
    the process and its /metrics URL."""
    login = broker_args(broker)
    if creds is not None:
        login = ["--broker", broker.operator_url, "--username", creds.username,
                 "--password-file", str(creds.password_file)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "exporter", "--listen", "127.0.0.1:0", *extra, *login],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"serving (http://\S+/metrics)", line)
        assert match, (
            f"exporter did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}"
        )
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def target_of(url: str) -> str:
    """``host:port`` of a /metrics URL, as a scrape config names it."""
    return urllib.parse.urlsplit(url).netloc


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def scrape_until(url: str, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        s = parse(scrape(url))
        if check(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched; last scrape had {len(s)} samples")
        time.sleep(0.1)


def test_exporter_serves_status_and_health_from_the_broker(broker: Broker) -> None:
    client = broker.client()
    publish(client, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    publish(
        client, "edge/devices/pi-9/status", status_payload("pi-9", "south", "offline"), retain=True
    )
    with exporter(broker) as (proc, url):
        one = {"device": "pi-1", "fleet": "north"}
        s = scrape_until(
            url,
            lambda s: (
                value(s, "edge_fleet_device_online", device="pi-9", fleet="south") is not None
            ),
        )
        assert value(s, "edge_fleet_device_online", **one) == 1.0
        assert value(s, "edge_fleet_device_online", device="pi-9", fleet="south") == 0.0
        assert value(s, "edge_fleet_exporter_broker_connected") == 1.0
        publish(client, "edge/devices/pi-1/health", health_payload("pi-1", "north", rows=7))
        s = scrape_until(url, lambda s: value(s, "edge_fleet_buffer_rows", **one) == 7)
        assert value(s, "edge_fleet_exporter_messages_total", kind="health") == 1
        # The device goes offline (its last will): the gauge follows.
        publish(
            client,
            "edge/devices/pi-1/status",
            status_payload("pi-1", "north", "offline"),
            retain=True,
        )
        scrape_until(url, lambda s: value(s, "edge_fleet_device_online", **one) == 0.0)
        # The broker goes away: the exporter keeps serving the last state and says so.
        client.disconnect()
        client.loop_stop()
        broker.stop()
        s = scrape_until(url, lambda s: value(s, "edge_fleet_exporter_broker_connected") == 0.0)
        assert value(s, "edge_fleet_buffer_rows", **one) == 7
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_shared_subscription_splits_health_between_exporters(broker: Broker) -> None:
    client = broker.client()
    publish(client, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    with (
        exporter(broker, "--share-group", "ops") as (_, url_a),
        exporter(broker, "--share-group", "ops") as (_, url_b),
    ):
        online = {"device": "pi-1", "fleet": "north"}
        for url in (url_a, url_b):  # status is retained and not shared: both know the device
            scrape_until(url, lambda s: value(s, "edge_fleet_device_online", **online) == 1.0)
        base = health_payload("pi-1", "north", inferences=1)
        for i in range(20):
            publish(
                client,
                "edge/devices/pi-1/health",
                {**base, "time": f"2026-01-01T00:00:{i:02d}.000Z"},
            )
        labels = {**online, "model": "iris", "version": "1.2.0"}

        def count(s: Samples) -> float:
            return value(s, "edge_fleet_model_inferences_total", **labels) or 0.0

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            a, b = count(parse(scrape(url_a))), count(parse(scrape(url_b)))
            if a + b == 20:
                break
            time.sleep(0.1)
        # Each health message went to exactly one exporter; sum() over them is the truth.
        assert (a + b, a > 0, b > 0) == (20, True, True)


def test_listen_address_errors(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli import main

    assert main(["exporter", "--listen", "nowhere", *broker_args(broker)]) == 2
    assert "--listen: 'nowhere' is not HOST:PORT" in capsys.readouterr().err
    with exporter(broker) as (_, url):
        taken = url.split("//")[1].split("/")[0]
        assert main(["exporter", "--listen", taken, *broker_args(broker)]) == 1
        assert f"--listen: {taken}: cannot serve: Address already in use" in capsys.readouterr().err


# --- the Grafana dashboard and a real Prometheus --------------------------------------------


def quality_sections() -> dict[str, Any]:
    """The board's model with the model-quality sections of health (docs/protocol.md):
    drift per feature, a shadow candidate's agreement, both arms of a canary split."""
    scores = [("x2", 0.9, [0.1] * 10), ("x0", 0.02, [0.1] * 10)]
    return {
        "version": "1.0.0", "requests": 100, "errors": 0,
        "drift": payloads.drift_summary("1.0.0", 900, scores, 0.2, top_k=2, budget=2048),
        "shadow": payloads.shadow_summary(
            candidate="1.1.0", against="1.0.0", compared=800, agreement=0.93,
            confusion=[["hi", "lo", 56]], error=None, latency_ms={}, skipped=0, failed=0),
        "canary": payloads.canary_summary(
            version="1.2.0", against="1.0.0", traffic=10,
            active=payloads.canary.canary_arm("1.0.0", 900, 0, 2.0),
            canary=payloads.canary.canary_arm("1.2.0", 100, 1, 3.0)),
    }  # fmt: skip


def dashboard_expressions() -> list[str]:
    """Every PromQL expression (the PostgreSQL panel's SQL is checked in test_exporter_db)."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if "expr" in t]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in doc.get("templating", {}).get("list", []) if v.get("type") == "query"]  # fmt: skip
    return exprs


def test_dashboard_uses_only_metrics_the_exporter_serves(tmp_path: Path) -> None:
    from fleet.exporter_db import CollectorFigures
    from fleet.exporter_rollouts import RolloutPlans
    from tests.fixtures.collected import stored_fleet
    from tests.fleet.rollout_plan import plan

    fleet = FleetState()
    model = {"version": "1.2.0", "state": "active",
             "desired": {"version": "1.2.0", "source": "fleet", "decision": "accepted"}}  # fmt: skip
    status = status_payload("pi-1", "north", models={"iris": model})
    fleet.apply("edge/devices/pi-1/status", msg(status), retained=True)
    health = health_payload("pi-1", "north", rows=3)
    health["models"]["region"] = quality_sections()  # the drift, shadow and canary panels
    fleet.apply("edge/devices/pi-1/health", msg(health))
    rollouts = RolloutPlans()
    rollouts.receive("edge/fleets/north/models/iris/rollout", msg(plan()))
    # With --db: a collector's database holding results and labels.
    url = f"sqlite:///{tmp_path / 'collect.db'}"
    stored_fleet(url, time.time())
    figures = CollectorFigures(url)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, figures=figures, rollouts=rollouts))
    served = set(parse(generate_latest(registry).decode()))
    figures.close()
    served_names = {name for name, _ in served}
    exprs = dashboard_expressions()
    assert len(exprs) >= 10
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] and doc["schemaVersion"] >= 30 and doc["uid"]
    for expr in exprs:  # every panel's query names something the exporter serves
        names = re.findall(r"\bedge_(?:fleet|collector|model)_[a-z0-9_]+", expr)
        assert names, f"queries no exporter metric: {expr}"
        assert set(names) <= served_names, (
            f"names metrics the exporter does not serve: {set(names) - served_names} in {expr}"
        )
    for figure in ("edge_collector_results_stored_total", "edge_collector_delay_seconds",
                   "edge_collector_last_stored_age_seconds", "edge_model_accuracy",
                   "edge_fleet_buffer_rows", "edge_fleet_buffer_oldest_age_seconds"):  # fmt: skip
        assert any(figure in e for e in exprs), f"no panel shows {figure}"


@needs_prometheus
@pytest.mark.slow
def test_prometheus_scrapes_the_exporter(broker: Broker, tmp_path: Path) -> None:
    client = broker.client()
    publish(client, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    with exporter(broker) as (_, url), running_prometheus(tmp_path, [target_of(url)]) as prom:
        prom.wait_up()
        result = prom.wait(lambda: prom.query("edge_fleet_device_online"), "a series")
        assert [(r["metric"]["device"], r["metric"]["fleet"], r["value"][1]) for r in result] == [
            ("pi-1", "north", "1")
        ]
