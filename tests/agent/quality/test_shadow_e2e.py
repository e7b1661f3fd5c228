"""``edge-fleet publish --shadow`` end to end: real mosquitto, a real agent, real models.

The candidate disagrees with the active version wherever x2 > 0.8; traffic is driven
through that region, which also shifts x2 away from the training sample. The device
keeps serving the active version, and its health names the disagreement (confusion)
and x2 as the most drifted feature.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.publish import publish
from tests.delivery_helpers import device_config, operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fixtures.quality import region_rows

pytestmark = [pytest.mark.timeout(120)]


def quality_agent(
    broker: Broker, keypair: Keypair, start_agent: Callable[..., Any], device: str, active: Path
) -> Any:
    config = device_config(broker, keypair, device)
    config.update(
        health={"interval_s": 1},
        shadow={"rate": 1.0, "cpu_share": 0.5},
        drift={"min_rows": 100},
    )
    return start_agent(config, packages=[active])


def health_where(
    log: Any, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> dict[str, Any]:
    def found(msgs: list[Any]) -> dict[str, Any] | None:
        for m in reversed(msgs):
            report = json.loads(m.payload)
            if predicate(report):
                return dict(report)
        return None

    log.wait_for(lambda msgs: found(msgs) is not None, timeout)
    report = found(list(log.messages))
    assert report is not None
    return report


def test_a_shadow_candidate_is_compared_not_served(
    broker: Broker,
    keypair: Keypair,
    start_agent: Callable[..., Any],
    region_active: Path,
    region_bad: Path,
) -> None:
    agent = quality_agent(broker, keypair, start_agent, "sh-1", region_active)
    health = broker.subscribe("edge/devices/sh-1/health")
    signed = publish(operator(broker), region_bad, fleet="f1", key=keypair.key, shadow=True)
    assert signed[0]["shadow"] is True
    status = agent.wait_for(
        lambda s: (
            (s["models"].get("region", {}).get("shadow") or {}).get("version") == "1.1.0"
            and (s["models"]["region"].get("desired") or {}).get("decision") == "shadow"
        ),
        30,
    )
    region = status["models"]["region"]
    assert region["version"] == "1.0.0" and region["state"] == "active"
    assert region["desired"]["decision"] == "shadow"
    for i in range(20):
        code, body = agent.request(
            "POST", "/predict", {"features": region_rows(20, inside=True, seed=i).tolist()}
        )
        assert code == 200 and body["version"] == "1.0.0", body
    report = health_where(
        health,
        lambda r: (r["models"].get("region", {}).get("shadow") or {}).get("compared", 0) >= 400,
    )
    shadow = report["models"]["region"]["shadow"]
    assert shadow["version"] == "1.1.0" and shadow["against"] == "1.0.0"
    assert shadow["agreement"] < 0.1, shadow
    assert {(a, c) for a, c, _ in shadow["confusion"][:2]} == {("hi", "lo"), ("lo", "hi")}
    drift = report["models"]["region"]["drift"]
    assert drift["top"][0]["feature"] == "x2" and drift["top"][0]["psi"] > 1.0, drift
    assert all(t["psi"] < drift["top"][0]["psi"] / 5 for t in drift["top"][1:]), drift
    text = agent.metrics_text()
    assert 'edge_shadow_agreement{candidate="1.1.0",model="region",version="1.0.0"}' in text
    # Restarted, the device takes the candidate beside the active version again.
    agent.stop()
    agent.start()
    agent.wait_for(
        lambda s: (s["models"].get("region", {}).get("shadow") or {}).get("version") == "1.1.0", 30
    )
    assert agent.status()["models"]["region"]["version"] == "1.0.0"


def test_a_local_shadow_install_is_picked_up_kept_over_restarts_and_promoted(
    start_agent: Callable[..., Any], region_active: Path, region_bad: Path
) -> None:
    agent = start_agent({"shadow": {"rate": 1.0}}, packages=[region_active])
    done = agent.cli("install", str(region_bad), "--shadow")
    assert done.returncode == 0 and "in shadow" in done.stdout, done.stderr

    def shadowing(s: dict[str, Any]) -> bool:
        return (s["models"]["region"].get("shadow") or {}).get("version") == "1.1.0"

    agent.wait_for(shadowing, 15)  # the running agent's store watcher loaded it
    rows = region_rows(20, inside=True).tolist()
    code, body = agent.request("POST", "/predict", {"features": rows})
    assert code == 200 and body["version"] == "1.0.0"
    agent.wait_for(lambda s: s["models"]["region"]["shadow"]["compared"] == 20, 15)
    agent.stop()
    agent.start()
    status = agent.wait_for(shadowing, 15)
    assert status["models"]["region"]["version"] == "1.0.0"
    # Installed for real, the candidate serves and its shadow ends.
    agent.install(region_bad)
    status = agent.wait_for(lambda s: s["models"]["region"]["version"] == "1.1.0", 15)
    assert "shadow" not in status["models"]["region"]
    agent.stop()
    agent.start()
    assert "shadow" not in agent.status()["models"]["region"]
