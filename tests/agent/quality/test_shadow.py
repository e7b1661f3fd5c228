"""Shadow evaluation on the device: the candidate runs on sampled requests beside the
active version, off the request path, within its CPU share; agreement, confusion, error
and latency in health and on /metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from agent.config import Config, ShadowConfig
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.quality.shadow import ShadowRunner
from agent.serving.routes import Service
from agent.wire import payloads
from tests.agent.serving.stack import load
from tests.fixtures.quality import region_rows


def stack(
    active: Path, candidate: Path | None, cfg: ShadowConfig
) -> tuple[Service, ShadowRunner, Metrics]:
    registry = Registry()
    registry.swap(load(active))
    if candidate is not None:
        registry.set_shadow(load(candidate))
    metrics = Metrics()
    runner = ShadowRunner(cfg, registry, metrics)
    return Service(Config(), registry, None, metrics, shadow=runner), runner, metrics


def predict(service: Service, rows: Any) -> dict[str, Any]:
    body = json.dumps({"features": np.asarray(rows).tolist()}).encode()
    reply = service.handle("POST", "/predict", "", {}, body)
    assert reply.status == 200, reply.body
    return dict(json.loads(reply.body))


def test_a_candidate_disagreeing_in_a_region_shows_in_agreement_and_confusion(
    region_active: Path, region_bad: Path
) -> None:
    service, runner, metrics = stack(region_active, region_bad, ShadowConfig(rate=1.0))
    for i in range(10):
        answer = predict(service, region_rows(20, inside=False, seed=i))
        assert answer["version"] == "1.0.0"  # the candidate never answers a caller
    runner.drain()
    calm = runner.summaries()["region"]
    assert calm["compared"] == 200 and calm["agreement"] >= 0.97, calm
    for i in range(10):
        predict(service, region_rows(20, inside=True, seed=100 + i))
    runner.drain()
    s = runner.summaries()["region"]
    assert s["version"] == "1.1.0" and s["against"] == "1.0.0" and s["compared"] == 400
    assert s["agreement"] < 0.6, s
    # Disagreements come first: every region row got the other label from the candidate.
    top = s["confusion"][:2]
    assert {(a, c) for a, c, _ in top} == {("hi", "lo"), ("lo", "hi")}, s["confusion"]
    assert sum(n for a, c, n in s["confusion"] if a != c) >= 190
    assert set(s["latency_ms"]) == {"active_p50", "active_p99", "candidate_p50", "candidate_p99"}
    text = generate_latest(metrics.registry).decode()
    assert (
        'edge_shadow_compared_rows_total{candidate="1.1.0",model="region",version="1.0.0"} 400.0'
        in text
    )
    assert 'edge_shadow_agreement{candidate="1.1.0",model="region",version="1.0.0"}' in text


def test_only_the_sampled_share_runs_and_a_full_queue_skips(
    region_active: Path, region_bad: Path
) -> None:
    service, runner, _ = stack(
        region_active, region_bad, ShadowConfig(rate=0.5, queue_batches=1000)
    )
    for i in range(400):
        predict(service, region_rows(1, inside=False, seed=i))
    assert 140 <= runner.drain() <= 260
    service, runner, _ = stack(region_active, region_bad, ShadowConfig(rate=1.0, queue_batches=5))
    for i in range(20):
        predict(service, region_rows(1, inside=False, seed=i))
    assert runner.drain() == 5
    assert runner.summaries()["region"]["skipped"] == 15


def test_the_loop_pauses_to_keep_its_cpu_share(region_active: Path, region_bad: Path) -> None:
    service, runner, _ = stack(region_active, region_bad, ShadowConfig(rate=1.0, cpu_share=0.2))
    predict(service, region_rows(500, inside=True))
    started = time.perf_counter()
    wait = runner._step()
    spent = time.perf_counter() - started
    # A run of t seconds is followed by 4 t of rest at a 20% share.
    assert spent > 0 and 3.0 * spent * 0.5 < wait <= 4.0 * spent, (spent, wait)
    assert runner._step() == pytest.approx(0.2)  # nothing queued: the idle wait


def test_no_candidate_no_work(region_active: Path) -> None:
    service, runner, _ = stack(region_active, None, ShadowConfig(rate=1.0))
    predict(service, region_rows(5, inside=True))
    assert runner.drain() == 0 and runner.summaries() == {}


def test_a_regressor_candidate_reports_its_error_distribution(
    make_package: Any, regressor_estimator: Any, regression_data: Any, regressor_package: Path
) -> None:
    from sklearn.linear_model import Ridge

    x, y = regression_data
    candidate = make_package(Ridge(alpha=50.0).fit(x, y), "ridge", "1.1.0", serial=2)
    service, runner, metrics = stack(regressor_package, candidate, ShadowConfig(rate=1.0))
    predict(service, x[:100].round(4))
    runner.drain()
    s = runner.summaries()["ridge"]
    assert s["agreement"] is None and "confusion" not in s
    e = s["error"]
    assert 0 < e["p50"] <= e["p90"] <= e["p99"] <= e["max"], e
    assert (
        'edge_shadow_abs_error{candidate="1.1.0",model="ridge",quantile="0.99",version="1.0.0"}'
        in (generate_latest(metrics.registry).decode())
    )


def test_promoting_the_candidate_ends_its_shadow(region_active: Path, region_good: Path) -> None:
    service, runner, _ = stack(region_active, region_good, ShadowConfig(rate=1.0))
    predict(service, region_rows(10, inside=False))
    runner.drain()
    assert runner.summaries()["region"]["version"] == "1.2.0"
    service.registry.swap(load(region_good))
    assert service.registry.shadow("region") is None
    assert runner.summaries() == {}
    assert "shadow" not in service.registry.status()["region"]


def test_a_malformed_shadow_section_is_refused_naming_the_field() -> None:
    section = payloads.shadow_summary(
        candidate="1.1.0", against="1.0.0", compared=10, agreement=0.5,
        confusion=[["a", "b", 5]], error=None, latency_ms={}, skipped=0, failed=0,
    )  # fmt: skip
    assert section["agreed"] == 5
    with pytest.raises(payloads.InvalidPayload, match=r"shadow: agreement: expected 0\.\.1"):
        payloads.check_shadow({**section, "agreement": 1.5}, "shadow")
    with pytest.raises(payloads.InvalidPayload, match="confusion: expected"):
        payloads.check_shadow({**section, "confusion": [["a", 3]]}, "shadow")
