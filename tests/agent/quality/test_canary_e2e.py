"""``edge-fleet publish --canary-traffic`` end to end: real mosquitto, a real agent, real models.

The canary serves its share of /predict and V2 requests beside the active version,
sticky by the X-Edge-Key header; answers name the version; a canary arm whose model
fails is dropped while the active version serves on; a bad percent changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.wire.errors import UsageError
from fleet.publish import publish, rollback
from tests.agent.serving.test_failures import nan_below
from tests.delivery_helpers import device_config, operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fixtures.quality import region_rows

pytestmark = [pytest.mark.timeout(180)]


def _canary_of(agent: Any, model: str, version: str | None) -> dict[str, Any]:
    return agent.wait_for(  # type: ignore[no-any-return]
        lambda s: (
            (s["models"].get(model, {}).get("canary") or {}).get("version") == version
            if version
            else s["models"].get(model, {}).get("canary") is None
        ),
        30,
    )


def test_the_canary_serves_its_share_sticky_by_key_and_is_promoted(
    broker: Broker, keypair: Keypair, start_agent: Callable[..., Any],
    region_active: Path, region_good: Path,
) -> None:  # fmt: skip
    agent = start_agent(device_config(broker, keypair, "cn-1"), packages=[region_active])
    signed = publish(operator(broker), region_good, fleet="f1", key=keypair.key,
                     canary_traffic=10)  # fmt: skip
    assert signed[0]["canary_traffic"] == 10
    _canary_of(agent, "region", "1.2.0")
    row = {"features": region_rows(1, inside=False).tolist()}
    served = []
    for _ in range(2000):
        code, body = agent.request("POST", "/predict", row)
        assert code == 200, body
        served.append(body["version"])
    share = served.count("1.2.0") / len(served)
    assert set(served) == {"1.0.0", "1.2.0"} and 0.075 <= share <= 0.125, share
    # The same key always gets the same version, on both protocols.
    by_key: dict[str, set[str]] = {}
    v2 = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                      "data": row["features"][0]}]}  # fmt: skip
    for i in range(300):
        key = f"caller-{i}"
        for _ in range(2):
            code, body = agent.request("POST", "/predict", row, headers={"X-Edge-Key": key})
            assert code == 200, body
            by_key.setdefault(key, set()).add(body["version"])
        code, body = agent.request("POST", "/v2/models/region/infer", v2,
                                   headers={"X-Edge-Key": key})  # fmt: skip
        assert code == 200, body
        by_key[key].add(body["model_version"])
    assert all(len(v) == 1 for v in by_key.values()), by_key
    keyed = sum(v == {"1.2.0"} for v in by_key.values()) / len(by_key)
    assert 0.04 <= keyed <= 0.17, keyed
    status = agent.wait_for(lambda s: (s["models"]["region"]["canary"].get("arms") or {})
                            .get("canary", {}).get("requests", 0) >= 150, 10)  # fmt: skip
    split = status["models"]["region"]["canary"]
    assert split["traffic"] == 10 and split["against"] == "1.0.0"
    arms = split["arms"]
    assert arms["active"]["requests"] + arms["canary"]["requests"] >= 2500
    assert arms["canary"]["errors"] == 0 and status["models"]["region"]["version"] == "1.0.0"
    metrics = agent.metrics_text()
    assert 'edge_canary_traffic_percent{model="region",version="1.2.0"} 10.0' in metrics
    assert 'edge_canary_requests{arm="canary",model="region",version="1.2.0"}' in metrics
    # Promotion: the same package without --canary-traffic makes it the only version.
    publish(operator(broker), region_good, fleet="f1", key=keypair.key)
    agent.wait_for(lambda s: s["models"]["region"]["version"] == "1.2.0"
                   and s["models"]["region"].get("canary") is None, 30)  # fmt: skip
    assert {agent.request("POST", "/predict", row)[1]["version"] for _ in range(50)} == {"1.2.0"}


def test_a_rollback_drops_the_canary(
    broker: Broker, keypair: Keypair, start_agent: Callable[..., Any],
    region_active: Path, region_good: Path,
) -> None:  # fmt: skip
    agent = start_agent(device_config(broker, keypair, "cn-3"), packages=[region_active])
    publish(operator(broker), region_active, fleet="f1", key=keypair.key)  # what it serves
    publish(operator(broker), region_good, fleet="f1", key=keypair.key, canary_traffic=50)
    _canary_of(agent, "region", "1.2.0")
    row = {"features": region_rows(1, inside=False).tolist()}
    assert {agent.request("POST", "/predict", row)[1]["version"] for _ in range(60)} == {
        "1.0.0", "1.2.0"}  # fmt: skip
    rollback(operator(broker), "region", fleet="f1", key=keypair.key, to="1.0.0")
    status = _canary_of(agent, "region", None)
    assert status["models"]["region"]["version"] == "1.0.0"
    assert {agent.request("POST", "/predict", row)[1]["version"] for _ in range(60)} == {"1.0.0"}


@pytest.mark.parametrize("bad", [0, -5, 100.5, 250, float("nan")])
def test_bad_canary_traffic_is_refused_without_publishing(
    broker: Broker, keypair: Keypair, region_good: Path, bad: float
) -> None:
    seen = broker.subscribe("edge/fleets/f1/#")
    with pytest.raises(UsageError, match=r"--canary-traffic: expected a percent 0 < p < 100, "
                       rf"got {bad!r}"):  # fmt: skip
        publish(operator(broker), region_good, fleet="f1", key=keypair.key, canary_traffic=bad)
    assert not [m for m in list(seen.messages) if "desired" in m.topic], "nothing is published"


def test_a_failing_canary_arm_is_dropped_while_the_active_serves(
    broker: Broker, keypair: Keypair, start_agent: Callable[..., Any], tmp_path: Path,
    make_package: Any, regressor_estimator: Any,
) -> None:  # fmt: skip
    active = make_package(regressor_estimator, "ridge", "1.0.0", serial=1)
    failing = nan_below(make_package(regressor_estimator, "ridge", "1.1.0", serial=2, sign=False),
                        tmp_path / "nan")  # fmt: skip
    config = device_config(broker, keypair, "cn-2", probation_min_requests=30)
    agent = start_agent(config, packages=[active])
    events = broker.subscribe("edge/devices/cn-2/events")
    publish(operator(broker), failing, fleet="f1", key=keypair.key, canary_traffic=50)
    _canary_of(agent, "ridge", "1.1.0")
    good, bad = [0.5, 0.1, -0.2, 0.3, 0.0], [-80.0, 0.0, 0.0, 0.0, 0.0]
    answered = {"1.0.0": 0, "1.1.0": 0}
    failed = 0
    for i in range(400):
        code, body = agent.request("POST", "/predict", {"features": [good if i % 2 else bad]})
        if code == 200:
            answered[body["version"]] += 1
        else:
            failed += 1
    assert failed > 0 and answered["1.0.0"] > 0
    status = _canary_of(agent, "ridge", None)
    assert status["models"]["ridge"]["version"] == "1.0.0"
    assert "canary 1.1.0 dropped: canary arm: error rate" in status["models"]["ridge"]["reason"]
    events.wait_for(lambda ms: any(json.loads(m.payload).get("event") == "rolled_back"
                                   for m in ms), 10)  # fmt: skip
    for _ in range(40):  # the active version answers everything again, bad rows included
        code, body = agent.request("POST", "/predict", {"features": [bad]})
        assert code == 200 and body["version"] == "1.0.0", body


def test_a_slow_canary_arm_is_dropped_on_latency(
    broker: Broker, keypair: Keypair, start_agent: Callable[..., Any],
    region_active: Path, make_package: Any,
) -> None:  # fmt: skip
    from sklearn.ensemble import RandomForestClassifier

    x = region_rows(3000, inside=False, seed=9)
    y = (x[:, 0] > 0.5).astype("int64")
    slow = RandomForestClassifier(n_estimators=400, max_depth=None, random_state=0).fit(x, y)
    package = make_package(slow, "region", "1.3.0", serial=4)
    config = device_config(broker, keypair, "cn-4", probation_min_requests=50,
                           probation_max_latency_ratio=2.0, probation_max_error_rate=0.5)  # fmt: skip
    agent = start_agent(config, packages=[region_active])
    publish(operator(broker), package, fleet="f1", key=keypair.key, canary_traffic=50)
    _canary_of(agent, "region", "1.3.0")
    # Batches big enough that the forest's run, not the request's fixed cost (decoding, the
    # buffer's group commit: about 2 ms here), sets each arm's latency: with 64 rows the
    # 400 trees made the canary arm only 1.3x slower and the 2x limit was rarely crossed.
    rows = {"features": region_rows(512, inside=False).tolist()}
    for _ in range(300):
        code, body = agent.request("POST", "/predict", rows)
        assert code == 200, body
        if agent.status()["models"]["region"].get("canary") is None:
            break
    status = _canary_of(agent, "region", None)
    assert "canary 1.3.0 dropped: canary arm: p99 latency" in status["models"]["region"]["reason"]
    assert status["models"]["region"]["version"] == "1.0.0"
