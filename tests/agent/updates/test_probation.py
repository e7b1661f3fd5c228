"""Probation: the judgement from numbers, the watcher on a real InferenceStats, and one
end-to-end rollback of a model that fails at run time on inputs its parity rows avoid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.config import ModelsConfig
from agent.disk import sha256_file
from agent.metrics import InferenceStats, WindowStats
from agent.updates.probation import Limits, Probation, Totals, decide
from agent.wire.package import read_manifest
from agent.wire.signing import load_private_key, sign_manifest
from fleet.publish import publish
from tests.delivery_helpers import device_config, operator, serving, wait_event
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

LIMITS = Limits(min_requests=10, max_error_rate=0.05, max_latency_ratio=3.0)


def totals(count: int, errors: int = 0, p99_ms: float | None = 2.0) -> Totals:
    t = Totals()
    t.add(WindowStats(count, errors, p99_ms, p99_ms))
    return t


# --- decide ------------------------------------------------------------------------


def test_too_few_requests_decide_nothing() -> None:
    assert decide(totals(9, errors=9), totals(100), LIMITS) is None


def test_error_rate_above_the_previous_versions_rolls_back() -> None:
    reason = decide(totals(20, errors=4), totals(100, errors=0), LIMITS)
    assert reason is not None
    assert "error rate 20.0% over 20 requests" in reason
    assert "previous version 0.0%" in reason


def test_errors_the_previous_version_had_too_are_not_the_new_versions_fault() -> None:
    # Clients sending bad rows fail on both versions alike.
    assert decide(totals(20, errors=4), totals(100, errors=20), LIMITS) is None


def test_without_a_baseline_the_error_limit_is_absolute() -> None:
    assert decide(totals(20, errors=1), None, LIMITS) is None
    assert decide(totals(20, errors=2), None, LIMITS) is not None


def test_latency_ratio_past_the_limit_rolls_back() -> None:
    reason = decide(totals(50, p99_ms=10.0), totals(50, p99_ms=2.0), LIMITS)
    assert reason is not None and "5.0x the previous version's 2.00 ms (limit 3x)" in reason
    assert decide(totals(50, p99_ms=5.0), totals(50, p99_ms=2.0), LIMITS) is None


def test_latency_is_not_judged_on_a_thin_baseline() -> None:
    assert decide(totals(50, p99_ms=10.0), totals(3, p99_ms=2.0), LIMITS) is None


# --- the watcher, fed through the real InferenceStats ----------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watcher(**cfg: Any) -> tuple[Probation, InferenceStats, Clock, list[tuple[str, ...]]]:
    stats, clock = InferenceStats(), Clock()
    calls: list[tuple[str, ...]] = []
    settings = ModelsConfig(probation_s=60, probation_min_requests=10, **cfg)
    probation = Probation(
        settings, stats,
        on_rollback=lambda m, v, r: calls.append(("rollback", m, v, r)),
        on_passed=lambda m, v: calls.append(("passed", m, v)),
        clock=clock,
    )  # fmt: skip
    return probation, stats, clock, calls


def test_failing_new_version_is_rolled_back_against_the_previous_figures() -> None:
    probation, stats, clock, calls = watcher()
    for _ in range(50):
        stats.observe("iris", "1.0.0", 0.002, True)
    probation.begin("iris", "1.1.0", "1.0.0")
    trial = probation.on_trial("iris")
    assert trial is not None and trial.baseline is not None and trial.baseline.count == 50
    for i in range(12):
        stats.observe("iris", "1.1.0", 0.002, i % 2 == 0)
    clock.now += 1
    probation.tick()
    assert calls and calls[0][:3] == ("rollback", "iris", "1.1.0")
    assert "error rate 50.0% over 12 requests" in calls[0][3]
    assert probation.on_trial("iris") is None


def test_healthy_new_version_passes_when_the_window_ends() -> None:
    probation, stats, clock, calls = watcher()
    for _ in range(30):
        stats.observe("iris", "1.0.0", 0.002, True)
    probation.begin("iris", "1.1.0", "1.0.0")
    for _ in range(30):
        stats.observe("iris", "1.1.0", 0.0021, True)
    clock.now += 30
    probation.tick()
    assert calls == []
    clock.now += 31
    probation.tick()
    assert calls == [("passed", "iris", "1.1.0")]


def test_callers_bad_requests_are_not_the_new_versions_errors() -> None:
    probation, stats, clock, calls = watcher()
    for _ in range(30):
        stats.observe("iris", "1.0.0", 0.002, True)
    probation.begin("iris", "1.1.0", "1.0.0")
    for _ in range(30):  # wrong-shape rows: refused before the model ran
        stats.refused("iris", "1.1.0")
    for _ in range(10):
        stats.observe("iris", "1.1.0", 0.002, True)
    clock.now += 1
    probation.tick()
    trial = probation.on_trial("iris")
    assert trial is not None
    assert (trial.figures.count, trial.figures.errors, trial.figures.bad_requests) == (10, 0, 30)
    clock.now += 60
    probation.tick()
    assert calls == [("passed", "iris", "1.1.0")]


def test_probation_s_zero_turns_it_off() -> None:
    probation, _stats, _clock, _calls = watcher()
    probation.cfg.probation_s = 0
    probation.begin("iris", "1.1.0", "1.0.0")
    assert probation.on_trial("iris") is None


# --- end to end ------------------------------------------------------------------------


def fails_on_large_first_feature(package: Path, out: Path, keypair: Keypair) -> Path:
    """The package with a graph that raises when feature 0 is 10 or more.

    Feature 0 is used as an index into a one-element tensor (floor(x0 / 10)); for
    x0 < 10 it adds zero, so warm-up and parity (iris rows, x0 < 8) pass unchanged,
    while a request with x0 >= 10 makes onnxruntime fail: a real run-time failure.
    """
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(package, out)
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    x = graph.input[0].name
    guarded = f"{x}_guarded"
    for node in graph.node:
        node.input[:] = [guarded if i == x else i for i in node.input]
    consts = [
        helper.make_tensor("g_starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("g_ends", TensorProto.INT64, [1], [1]),
        helper.make_tensor("g_axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("g_ten", TensorProto.FLOAT, [], [10.0]),
        helper.make_tensor("g_table", TensorProto.FLOAT, [1], [0.0]),
    ]
    nodes = [
        helper.make_node("Slice", [x, "g_starts", "g_ends", "g_axes"], ["g_x0"]),
        helper.make_node("Div", ["g_x0", "g_ten"], ["g_scaled"]),
        helper.make_node("Floor", ["g_scaled"], ["g_floor"]),
        helper.make_node("Cast", ["g_floor"], ["g_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["g_table", "g_index"], ["g_zero"]),
        helper.make_node("Add", [x, "g_zero"], [guarded]),
    ]
    graph.initializer.extend(consts)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    manifest = read_manifest(out).to_dict()
    manifest["artifact"] = {**manifest["artifact"], "size": (out / "model.onnx").stat().st_size,
                            "sha256": sha256_file(out / "model.onnx")}  # fmt: skip
    signed = sign_manifest(manifest, load_private_key(keypair.key))
    (out / "manifest.json").write_text(json.dumps(signed))
    return out


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_version_failing_real_requests_is_rolled_back_by_itself(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    # min_requests = the failing requests sent: no verdict before the last one is answered
    cfg = device_config(broker, keypair, "prob-0", probation_s=60, probation_min_requests=12,
                        probation_max_error_rate=0.2)  # fmt: skip
    agent = start_agent(cfg, packages=[iris_package])
    rows = [[12.0, 3.0, 4.0, 1.2]]  # a valid row, outside iris's range of sepal length
    for _ in range(20):  # the previous version's figures: all answered
        assert agent.request("POST", "/predict", {"features": rows})[0] == 200
    bad = fails_on_large_first_feature(iris_package_v2, tmp_path / "bad", keypair)
    publish(operator(broker), bad, fleet="f1", key=keypair.key)
    wait_event(log, "activated", device="prob-0", version="1.1.0")
    status = agent.status()["models"]["iris"]
    assert (status["version"], status["state"]) == ("1.1.0", "probation")
    assert status["probation"]["against"] == "1.0.0" and status["probation"]["remaining_s"] > 0
    answers = [agent.request("POST", "/predict", {"features": rows})[0] for _ in range(12)]
    assert all(code >= 400 for code in answers)  # the new version really fails them
    event = wait_event(log, "rolled_back", device="prob-0", timeout=15)
    assert event["version"] == "1.0.0" and event["from_version"] == "1.1.0"
    assert "error rate 100.0% over 12 requests" in event["reason"]
    assert serving(agent) == "1.0.0"
    assert agent.request("POST", "/predict", {"features": rows})[0] == 200
    status = agent.status()["models"]["iris"]
    assert status["state"] == "rolled_back" and "probation of 1.1.0" in status["reason"]
    assert status["desired"]["version"] == "1.1.0"
    assert status["desired"]["decision"] == "rolled_back"
    # The rolled-back manifest stays retained; the agent does not take it again.
    activated = len([m for m in log.messages if b'"activated"' in m.payload])
    agent.stop()
    agent.start()
    # The retained manifest arrives again and is weighed: accepted before, not retried.
    desired = agent.wait_for(
        lambda st: st["desired"].get("iris", {}).get("decision") == "accepted", timeout=30
    )["desired"]["iris"]
    assert desired["applies"] == "fleet" and desired["sources"]["fleet"]["version"] == "1.1.0"
    assert serving(agent) == "1.0.0"
    assert len([m for m in log.messages if b'"activated"' in m.payload]) == activated
    assert "a new serial tries 1.1.0 again" in desired["reason"]
    # A new serial (the operator publishes it again, a fix or not) is tried again.
    publish(operator(broker), bad, fleet="f1", key=keypair.key)
    again = wait_event(log, "activated", device="prob-0", version="1.1.0", serial=3)
    assert again["previous"] == "1.0.0"
    assert agent.status()["models"]["iris"]["state"] == "probation"


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_wrong_shape_requests_do_not_roll_a_good_version_back(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    log = broker.subscribe("edge/devices/+/events")
    cfg = device_config(broker, keypair, "prob-1", probation_s=6, probation_min_requests=20)
    agent = start_agent(cfg, packages=[iris_package])
    publish(operator(broker), iris_package_v2, fleet="f1", key=keypair.key)
    wait_event(log, "activated", device="prob-1", version="1.1.0")
    assert agent.status()["models"]["iris"]["state"] == "probation"
    for _ in range(30):  # a client sending 3 features of 4: its mistake, every time
        code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4]]})
        assert code == 400, body
    for _ in range(5):
        assert agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})[0] == 200
    settled = agent.wait_for(lambda st: st["models"]["iris"]["state"] != "probation", timeout=30)
    status = settled["models"]["iris"]
    assert (status["version"], status["state"]) == ("1.1.0", "active"), status
    assert "passed probation" in status["reason"]
    assert not [m for m in log.messages if b'"rolled_back"' in m.payload]
