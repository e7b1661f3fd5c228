"""Health reports: every field of the contract, sane values, on schedule, on /metrics."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from agent.config import BufferConfig, Config
from agent.health import HealthReporter, soc_temperature
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.paho_link import MqttClient
from agent.results.buffer import Result, ResultBuffer
from tests.fixtures.broker import Broker

FIELDS = {
    "device", "fleet", "time", "uptime_s", "agent_version", "cpu_percent", "load", "memory",
    "disk_free_bytes", "soc_temp_c", "models", "buffer", "mqtt", "forwarded",
}  # fmt: skip


def make_thermal(root: Path, zones: dict[str, tuple[str, str]]) -> Path:
    for name, (kind, temp) in zones.items():
        (root / name).mkdir(parents=True)
        (root / name / "type").write_text(kind + "\n")
        (root / name / "temp").write_text(temp + "\n")
    return root


def test_soc_temperature_prefers_the_cpu_zone(tmp_path: Path) -> None:
    root = make_thermal(
        tmp_path, {"thermal_zone0": ("acpitz", "27800"), "thermal_zone1": ("cpu-thermal", "48312")}
    )
    assert soc_temperature(root) == 48.3
    assert soc_temperature(tmp_path / "none") is None


def reporter(tmp_path: Path, mqtt: MqttClient | None = None, **kw: object) -> HealthReporter:
    cfg = Config()
    cfg.device.id, cfg.device.fleet, cfg.state_dir = "dev-1", "f1", str(tmp_path / "state")
    cfg.health.interval_s = 1.0
    metrics = Metrics()
    buffer = ResultBuffer(tmp_path / "buffer.db", BufferConfig(max_rows=5), metrics)
    return HealthReporter(cfg, Registry(), buffer, mqtt, metrics, **kw)  # type: ignore[arg-type]


def test_report_has_every_field_with_sane_values(tmp_path: Path) -> None:
    thermal = make_thermal(tmp_path / "thermal", {"thermal_zone0": ("cpu-thermal", "51000")})
    h = reporter(tmp_path, thermal_root=thermal)
    assert h.metrics is not None
    for i in range(10):
        h.buffer.record(Result(time.time(), "iris", "1.0", [[i]], [0], 1.0))
    for ms in range(1, 101):
        h.metrics.inference.observe("iris", "1.0", ms / 1000, ok=True)
    h.metrics.inference.observe("iris", "1.0", 0.5, ok=False)
    h.metrics.inference.refused("iris", "1.0")  # a caller's bad row: not the model's error
    r = h.report()
    assert set(r) >= FIELDS
    assert r["device"] == "dev-1" and r["fleet"] == "f1"
    assert 0 <= r["cpu_percent"] <= 100 and len(r["load"]) == 3
    assert 0 < r["memory"]["agent_rss"] < r["memory"]["used"] + r["memory"]["available"]
    assert r["disk_free_bytes"] > 0
    assert r["soc_temp_c"] == 51.0
    assert r["uptime_s"] >= 0
    iris = r["models"]["iris"]
    assert (iris["version"], iris["inferences"], iris["errors"]) == ("1.0", 101, 1)
    assert iris["bad_requests"] == 1
    assert iris["p50_ms"] == 50.0 and 99.0 <= iris["p99_ms"] <= 100.0
    assert r["buffer"]["rows"] == 5 and r["buffer"]["dropped"]["max_rows"] == 5
    assert r["buffer"]["oldest_age_s"] >= 0
    assert r["mqtt"] == {"connected": False, "reconnects": 0}
    # The window restarts at each report (and no model is loaded in this registry).
    assert "iris" not in h.report()["models"]
    text = generate_latest(h.metrics.registry).decode()
    assert "edge_device_soc_temperature_celsius 51.0" in text
    assert 'edge_device_load{period="1m"}' in text
    assert "edge_agent_rss_bytes" in text and "edge_device_disk_free_bytes" in text
    assert "edge_health_reports_total 2.0" in text
    assert "edge_model_bad_requests_interval" in text


def test_dropped_lists_every_reason_with_zeros_before_any_drop(tmp_path: Path) -> None:
    # An empty object left the fleet's drop counter without a series to graph or alert on.
    h = reporter(tmp_path)
    dropped = h.report()["buffer"]["dropped"]
    assert dropped == {"max_rows": 0, "max_bytes": 0, "max_age": 0, "disk_full": 0,
                       "io_error": 0}  # fmt: skip


def test_first_cpu_reading_is_not_the_unprimed_zero(tmp_path: Path) -> None:
    h = reporter(tmp_path)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # burn CPU in this process
        sum(range(10_000))
    assert h.report()["agent_cpu_percent"] > 0


def test_health_arrives_on_schedule(broker: Broker, tmp_path: Path) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    seen = broker.subscribe("edge/devices/dev-1/health")
    cfg = Config()
    cfg.device.id = "dev-1"
    for key, value in broker.mqtt_settings(creds).items():
        setattr(cfg.mqtt, key, value)
    mqtt = MqttClient(cfg)
    mqtt.start()
    h = reporter(tmp_path, mqtt)
    h.start()
    try:
        msgs = seen.wait_for(lambda m: len(m) >= 4, timeout=15)
    finally:
        h.stop()
        mqtt.stop()
    reports = [json.loads(m.payload) for m in msgs]
    assert all(set(r) >= FIELDS for r in reports)
    assert reports[-1]["mqtt"]["connected"] is True
    # interval_s = 1: consecutive reports about a second apart.
    times = [time.mktime(time.strptime(r["time"][:19], "%Y-%m-%dT%H:%M:%S")) for r in reports]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0 <= g <= 2 for g in gaps), gaps
    assert h.alive() is False  # stopped


def test_running_agent_reports_health_and_metrics(
    broker: Broker, start_agent: Callable[..., Any], iris_package: Path
) -> None:
    creds = broker.add_device("pi-1", fleet="f1")
    seen = broker.subscribe("edge/devices/pi-1/health")
    agent = start_agent(
        {"device": {"id": "pi-1", "fleet": "f1"}, "mqtt": broker.mqtt_settings(creds),
         "health": {"interval_s": 1}},
        packages=[iris_package],
    )  # fmt: skip
    for _ in range(20):
        code, _body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
        assert code == 200
    msgs = seen.wait_for(
        lambda m: any(json.loads(x.payload)["models"].get("iris", {}).get("inferences") for x in m),
        timeout=15,
    )
    reports = [json.loads(m.payload) for m in msgs]
    served = [r for r in reports if r["models"]["iris"]["inferences"]]
    assert sum(r["models"]["iris"]["inferences"] for r in served) <= 20
    iris = served[0]["models"]["iris"]
    assert iris["version"] == "1.0.0" and iris["errors"] == 0
    assert 0 < iris["p50_ms"] <= iris["p99_ms"] < 1000
    assert reports[-1]["mqtt"]["connected"] is True
    assert 10_000_000 < reports[-1]["memory"]["agent_rss"] < 1_000_000_000
    code, text = agent.request("GET", "/metrics")
    assert code == 200
    assert "edge_mqtt_connected 1.0" in text
    assert "edge_device_memory_available_bytes" in text
    # Per model, from the last report (loaded models appear even without traffic).
    assert 'edge_model_inferences_interval{model="iris",version="1.0.0"}' in text
