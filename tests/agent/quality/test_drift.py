"""Drift summaries: the converter's reference profile, live binning off the request path,
PSI per feature within the health byte budget, /metrics, and a real agent reporting it."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from agent.config import Config, DriftConfig
from agent.health import HealthReporter
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.quality.drift import DriftMonitor
from agent.results.buffer import ResultBuffer
from agent.serving.routes import Service
from agent.wire import payloads
from agent.wire.errors import ManifestInvalid, SignatureInvalid
from agent.wire.manifest import parse_manifest
from agent.wire.package import read_manifest
from agent.wire.profile import EPSILON, psi
from agent.wire.signing import load_trusted_keys, verify_signature
from tests.agent.serving.stack import load
from tests.fixtures.broker import Broker

SHIFTED = 2  # the feature the live traffic moves


@pytest.fixture(scope="session")
def profiled_ridge(make_package: Any, regressor_estimator: Any, regression_data: Any) -> Path:
    """The 5-feature Ridge regressor, converted with its training sample."""
    return make_package(regressor_estimator, "ridge", "1.0.0", sample=regression_data[0])  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def profiled_iris(make_package: Any, iris_estimator: Any, iris_data: Any) -> Path:
    return make_package(iris_estimator, "iris", "1.0.0", sample=iris_data[0])  # type: ignore[no-any-return]


def live_rows(n: int, *, shift: float, seed: int = 11) -> list[list[float]]:
    """Rows like the training sample (standard normal), feature SHIFTED moved by ``shift``."""
    x = np.random.default_rng(seed).normal(size=(n, 5))
    x[:, SHIFTED] += shift
    return x.round(4).tolist()  # type: ignore[no-any-return]


# --- the reference profile in the package -----------------------------------------------


def test_converter_stores_decile_bins_and_output_distribution(
    profiled_ridge: Path, profiled_iris: Path, iris_package: Path
) -> None:
    raw = read_manifest(profiled_ridge).to_dict()["profile"]
    assert raw["rows"] == 200
    assert [f["name"] for f in raw["features"]] == ["x0", "x1", "x2", "x3", "x4"]
    for f in raw["features"]:
        assert len(f["edges"]) == 9 and f["input"] == "input"
        assert all(abs(share - 0.1) < 0.011 for share in f["fractions"]), f["fractions"]
    assert raw["output"]["name"] == "variable" and len(raw["output"]["edges"]) == 9
    iris = read_manifest(profiled_iris).profile
    assert iris is not None and iris.output is not None
    assert iris.output.classes == ("setosa", "versicolor", "virginica")
    # The model's answers on the sample (not the true labels): near a third each.
    assert math.isclose(float(iris.output.fractions.sum()), 1.0, abs_tol=1e-5)
    assert all(abs(float(v) - 1 / 3) < 0.03 for v in iris.output.fractions)
    # No --sample: generated rows are not the training data, so no profile at all.
    assert read_manifest(iris_package).profile is None


def test_profile_is_covered_by_the_signature(profiled_ridge: Path, keypair: Any) -> None:
    manifest = read_manifest(profiled_ridge)
    trusted = load_trusted_keys([keypair.pub])
    assert verify_signature(manifest, trusted) is not None
    raw = manifest.to_dict()
    raw["profile"] = json.loads(json.dumps(raw["profile"]))
    raw["profile"]["features"][0]["fractions"] = [0.5, 0.5] + [0.0] * 8
    with pytest.raises(SignatureInvalid, match="changed after signing"):
        verify_signature(parse_manifest(raw), trusted)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(rows=-1), "profile.rows: expected a non-negative integer"),
        (lambda p: p["features"][1].update(input="nope"), r"profile.features\[1\].input: 'nope'"),
        (lambda p: p["features"][0].update(column=5), r"profile.features\[0\].column: .*0..4"),
        (
            lambda p: p["features"][2].update(fractions=[1.0]),
            r"features\[2\].fractions: expected 10",
        ),
        (lambda p: p["features"][0].update(edges=[3, 2, 1]), r"features\[0\].edges: expected incr"),
        (lambda p: p["output"].update(name="other"), "profile.output.name: 'other' is not one"),
        (lambda p: p["features"][0].update(fractions=[0.5] * 10), "sum to 1, got sum 5.0"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_field(
    profiled_ridge: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    raw = json.loads(json.dumps(read_manifest(profiled_ridge).to_dict()))
    change(raw["profile"])
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(raw)


def test_psi_is_zero_on_the_reference_and_finite_on_empty_bins() -> None:
    reference = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(np.array([25.0, 25, 25, 25]), reference) == 0.0
    # Two bins swapped halves: (0.4-0.1)ln4 + (0.1-0.4)ln(1/4) twice = 4 * 0.3 * ln 4.
    moved = psi(np.array([40.0, 10, 40, 10]), np.array([0.1, 0.4, 0.1, 0.4]))
    assert math.isclose(moved, 4 * 0.3 * math.log(4), rel_tol=1e-9)
    # An empty live bin counts as EPSILON, not as an infinite score.
    empty = psi(np.array([0.0, 50, 50, 0]), reference)
    expected = 2 * (EPSILON - 0.25) * math.log(EPSILON / 0.25) + 2 * 0.25 * math.log(2)
    assert math.isclose(empty, expected, rel_tol=1e-9)


# --- live binning, in process -----------------------------------------------------------


def service_with_drift(
    package: Path, cfg: DriftConfig | None = None
) -> tuple[Service, DriftMonitor, Metrics]:
    registry = Registry()
    registry.swap(load(package))
    metrics = Metrics()
    monitor = DriftMonitor(cfg or DriftConfig(min_rows=100), metrics)
    return Service(Config(), registry, None, metrics, drift=monitor), monitor, metrics


def predict(service: Service, rows: list[list[float]]) -> None:
    reply = service.handle("POST", "/predict", "", {}, json.dumps({"features": rows}).encode())
    assert reply.status == 200, reply.body


def test_the_shifted_feature_scores_above_the_others(profiled_ridge: Path) -> None:
    service, monitor, metrics = service_with_drift(profiled_ridge)
    for i in range(20):
        predict(service, live_rows(50, shift=0.0, seed=i))
    monitor.drain()
    calm = monitor.summaries()["ridge"]
    assert calm["rows"] == 1000 and calm["score"] < 0.1, calm
    service, monitor, metrics = service_with_drift(profiled_ridge)
    for i in range(20):
        predict(service, live_rows(50, shift=1.5, seed=i))
    monitor.drain()
    section = monitor.summaries()["ridge"]
    top = section["top"]
    assert top[0]["feature"] == f"x{SHIFTED}" and top[0]["psi"] > 0.5, top
    assert all(t["psi"] < 0.1 for t in top[1:]), top
    assert len(top[0]["live"]) == 10 and section["rest"]["features"] == 0
    assert section["output_psi"] > 0.1  # the shifted feature moves the predictions too
    text = generate_latest(metrics.registry).decode()
    assert f'edge_model_drift_psi{{feature="x{SHIFTED}",model="ridge",version="1.0.0"}}' in text
    assert 'edge_model_drift_score{model="ridge",version="1.0.0"}' in text


def test_no_score_before_min_rows(profiled_ridge: Path) -> None:
    service, monitor, _ = service_with_drift(profiled_ridge, DriftConfig(min_rows=500))
    predict(service, live_rows(100, shift=3.0))
    monitor.drain()
    section = monitor.summaries()["ridge"]
    assert section["score"] is None and section["top"] == [] and section["rows"] == 100


def test_a_model_without_profile_is_not_watched(iris_package: Path) -> None:
    service, monitor, _ = service_with_drift(iris_package)
    predict(service, [[5.1, 3.5, 1.4, 0.2]] * 10)
    assert monitor.drain() == 0 and monitor.summaries() == {}


def test_a_full_queue_skips_batches_and_never_waits(profiled_ridge: Path) -> None:
    service, monitor, metrics = service_with_drift(
        profiled_ridge, DriftConfig(queue_batches=3, min_rows=1)
    )
    started = time.perf_counter()
    for i in range(10):
        predict(service, live_rows(5, shift=0.0, seed=i))
    assert time.perf_counter() - started < 5
    assert monitor.skipped == 7 and monitor.drain() == 3
    assert "edge_drift_skipped_batches_total 7.0" in generate_latest(metrics.registry).decode()


def test_the_window_halves_old_counts(profiled_ridge: Path) -> None:
    service, monitor, _ = service_with_drift(
        profiled_ridge, DriftConfig(window_rows=400, min_rows=1)
    )
    for i in range(10):
        predict(service, live_rows(100, shift=3.0, seed=i))
        monitor.drain()
    shifted = monitor.summaries()["ridge"]["score"]
    for i in range(10):
        predict(service, live_rows(100, shift=0.0, seed=100 + i))
        monitor.drain()
    section = monitor.summaries()["ridge"]
    # 1000 calm rows against a window of 400: the shifted rows weigh under 1/16 now.
    assert section["rows"] <= 400 and section["score"] < shifted / 5, (shifted, section)


def test_many_features_fit_the_byte_budget(
    make_package: Any, rf_estimator: Any, rf_data: Any
) -> None:
    package = make_package(rf_estimator, "rf", "1.0.0", sample=rf_data[0])
    service, monitor, _ = service_with_drift(
        package, DriftConfig(min_rows=1, top_k=5, report_bytes=400)
    )
    x = rf_data[0][:300].copy()
    x[:, 7] += 4.0
    predict(service, x.round(4).tolist())
    monitor.drain()
    section = monitor.summaries()["rf"]
    size = len(payloads.encode(section))
    assert size <= 400, (size, section)
    assert section["top"] and section["top"][0]["feature"] == "x7"
    named = len(section["top"])
    assert named + section["rest"]["features"] == 20
    wide = DriftMonitor(DriftConfig(min_rows=1, top_k=5, report_bytes=4096))
    wide._profiles = monitor._profiles
    assert [len(t["live"]) for t in wide.summaries()["rf"]["top"]] == [10] * 5


def test_health_carries_the_drift_section(profiled_ridge: Path, tmp_path: Path) -> None:
    service, monitor, metrics = service_with_drift(profiled_ridge)
    predict(service, live_rows(300, shift=2.0))
    monitor.drain()
    cfg = Config()
    cfg.device.id, cfg.state_dir = "dev-1", str(tmp_path)
    buffer = ResultBuffer(tmp_path / "b.db", cfg.buffer)
    reporter = HealthReporter(cfg, service.registry, buffer, None, metrics, drift=monitor)
    report = reporter.report()
    assert report["models"]["ridge"]["drift"]["top"][0]["feature"] == f"x{SHIFTED}"
    bad = json.loads(json.dumps(report))
    bad["models"]["ridge"]["drift"]["top"][0]["psi"] = "high"
    with pytest.raises(payloads.InvalidPayload, match=r"models.ridge.drift: top\[0\]: psi"):
        payloads.check_health(bad, "health")
    buffer.close()


# --- a real agent -----------------------------------------------------------------------


def test_running_agent_reports_drift_in_health_and_metrics(
    broker: Broker, start_agent: Callable[..., Any], profiled_ridge: Path
) -> None:
    creds = broker.add_device("pi-1", fleet="f1")
    seen = broker.subscribe("edge/devices/pi-1/health")
    agent = start_agent(
        {"device": {"id": "pi-1", "fleet": "f1"}, "mqtt": broker.mqtt_settings(creds),
         "health": {"interval_s": 1}, "drift": {"min_rows": 200, "report_bytes": 1024}},
        packages=[profiled_ridge],
    )  # fmt: skip
    for i in range(10):
        code, body = agent.request(
            "POST", "/predict", {"features": live_rows(40, shift=2.0, seed=i)}
        )
        assert code == 200, body

    def drifted(msgs: list[Any]) -> bool:
        return any(
            (json.loads(m.payload)["models"].get("ridge", {}).get("drift") or {}).get("score")
            for m in msgs
        )

    msgs = seen.wait_for(drifted, timeout=20)
    report = next(json.loads(m.payload) for m in reversed(msgs) if drifted([m]))
    section = report["models"]["ridge"]["drift"]
    assert section["version"] == "1.0.0" and section["rows"] == 400
    assert section["top"][0]["feature"] == f"x{SHIFTED}" and section["top"][0]["psi"] > 0.5
    assert len(payloads.encode(section)) <= 1024
    text = agent.metrics_text()
    assert f'edge_model_drift_psi{{feature="x{SHIFTED}",model="ridge",version="1.0.0"}}' in text
