"""Metrics: inference windows for health and probation, and /metrics as Prometheus reads it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import InferenceStats, Metrics
from tests.agent.serving.stack import serve


def test_window_percentiles_count_and_errors() -> None:
    stats = InferenceStats()
    window = stats.subscribe()
    for ms in range(1, 101):
        stats.observe("iris", "1.0.0", ms / 1000, True)
    stats.observe("iris", "1.0.0", 0.5, False)
    stats.observe("ridge", "2.0", 0.002, True)
    taken = window.take()
    iris = taken[("iris", "1.0.0")]
    assert (iris.count, iris.errors) == (101, 1)
    assert iris.p50_ms == pytest.approx(50.0)
    assert iris.p99_ms == pytest.approx(99.0)
    assert taken[("ridge", "2.0")].p50_ms == pytest.approx(2.0)
    assert window.take() == {}  # a take empties the window


def test_windows_are_independent() -> None:
    stats = InferenceStats()
    health, probation = stats.subscribe(), stats.subscribe()
    stats.observe("m", "1", 0.001, True)
    assert health.take()[("m", "1")].count == 1
    stats.observe("m", "1", 0.001, True)
    assert probation.take()[("m", "1")].count == 2  # health's take did not steal them
    assert health.take()[("m", "1")].count == 1
    stats.unsubscribe(health)
    stats.observe("m", "1", 0.001, True)
    assert health.take() == {}


def test_only_failures_have_no_percentiles() -> None:
    stats = InferenceStats()
    window = stats.subscribe()
    stats.observe("m", "1", 0.01, False)
    only = window.take()[("m", "1")]
    assert (only.count, only.errors, only.p50_ms, only.p99_ms) == (1, 1, None, None)


def test_window_memory_is_bounded_under_concurrency() -> None:
    stats = InferenceStats()
    window = stats.subscribe(capacity=100)

    def work() -> None:
        for i in range(2000):
            stats.observe("m", "1", (i % 10 + 1) / 1000, True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(window._series[("m", "1")].samples) == 100
    taken = window.take()[("m", "1")]
    assert taken.count == 8000
    assert taken.p50_ms is not None and 1.0 <= taken.p50_ms <= 10.0


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    matches = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())
    ]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def test_metrics_endpoint_counts_requests_errors_and_latency(
    tmp_path: Path, iris_package: Path
) -> None:
    with serve(tmp_path, iris_package) as served:
        c = served.client()
        for _ in range(7):
            assert c.predict({"features": [[5.1, 3.5, 1.4, 0.2]]}).status == 200
        assert c.predict({"features": [[1, 2, 3]]}).status == 400
        assert c.predict({"features": [[1, 2, 3, 4]]}, "?model=typo").status == 404
        infer = {
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
        }
        assert c.request("POST", "/v2/models/iris/infer", infer).status == 200
        r = c.request("GET", "/metrics")
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain; version=")
        samples = families(r.body.decode())

    labels = {"route": "/predict", "model": "iris", "version": "1.0.0"}
    assert value(samples, "edge_http_requests_total", status="200", **labels) == 7
    assert value(samples, "edge_http_requests_total", status="400", **labels) == 1
    assert value(samples, "edge_http_errors_total", status="400", **labels) == 1
    # An unknown model name does not become a label value.
    assert value(samples, "edge_http_requests_total", route="/predict", status="404") == 1
    assert all(lab.get("model") != "typo" for lab, _ in samples["edge_http_requests_total"])
    infer_route = {"route": "/v2/models/{model}/infer", "model": "iris", "version": "1.0.0"}
    assert value(samples, "edge_http_requests_total", status="200", **infer_route) == 1
    assert (
        value(samples, "edge_inference_latency_seconds_count", model="iris", version="1.0.0") == 8
    )
    assert (
        value(
            samples,
            "edge_inference_latency_seconds_bucket",
            model="iris",
            version="1.0.0",
            le="+Inf",
        )
        == 8
    )
    assert (
        value(
            samples,
            "edge_inference_latency_seconds_bucket",
            model="iris",
            version="1.0.0",
            le="0.0001",
        )
        <= 8
    )
    assert value(samples, "process_resident_memory_bytes") > 10 * 1024 * 1024
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "edge_buffer_rows") == 8  # the buffer registered on the same registry


def test_other_components_register_on_the_same_registry() -> None:
    from prometheus_client import Gauge, generate_latest

    metrics = Metrics()
    Gauge("edge_mqtt_connected", "1 when connected", registry=metrics.registry).set(1)
    assert "edge_mqtt_connected 1.0" in generate_latest(metrics.registry).decode()
