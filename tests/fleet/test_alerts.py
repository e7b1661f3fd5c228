"""The shipped alert rules (prometheus/edge-alerts.yml): promtool, and a real Prometheus
loading them over real agents, a real broker and ``edge-fleet exporter``.

The end-to-end test shortens every ``for:`` on a copy of the rules (the expressions are
the shipped ones) and makes each alert happen the way it happens in a fleet: a version
that fails real requests is rolled back by probation, an operator's rollout plan says
halted, and an agent is killed so the broker publishes its last will.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet.publish import publish
from tests.agent.updates.test_probation import fails_on_large_first_feature
from tests.delivery_helpers import device_config, operator, wait_event
from tests.fixtures.broker import ROOT, Broker
from tests.fixtures.models import Keypair
from tests.fixtures.prometheus import (
    RULES,
    needs_prometheus,
    needs_promtool,
    running_prometheus,
    shortened_rules,
)
from tests.fleet.rollout_plan import plan
from tests.fleet.test_exporter import exporter, target_of


@needs_promtool
def test_shipped_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)],
                           check=False, capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tests = ROOT / "prometheus" / "edge-alerts.test.yml"
    unit = subprocess.run(["promtool", "test", "rules", str(tests)],
                          check=False, capture_output=True, text=True, cwd=tests.parent)  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Every alert the file ships has a unit test.
    shipped = {line.split(":", 1)[1].strip() for line in RULES.read_text().splitlines()
               if line.strip().startswith("- alert:")}  # fmt: skip
    tested = {line.split(":", 1)[1].strip() for line in tests.read_text().splitlines()
              if line.strip().startswith("alertname:")}  # fmt: skip
    assert shipped and shipped <= tested, f"alerts without a unit test: {shipped - tested}"


def agent_config(broker: Broker, keypair: Keypair, device: str, **models: Any) -> dict[str, Any]:
    cfg = device_config(broker, keypair, device, "f1", **models)
    cfg["mqtt"]["keepalive"] = 5  # the last will follows a kill in about 7 s
    cfg["health"] = {"interval_s": 1}
    return cfg


@needs_prometheus
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_alerts_fire_in_a_real_prometheus(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    events = broker.subscribe("edge/devices/+/events")
    # a-1 watches a delivered version on probation; a-2 is the one that dies.
    watcher = start_agent(
        agent_config(broker, keypair, "a-1", probation_s=120, probation_min_requests=12,
                     probation_max_error_rate=0.2),
        packages=[iris_package],
    )  # fmt: skip
    doomed = start_agent(agent_config(broker, keypair, "a-2"), packages=[iris_package])
    rules = shortened_rules(tmp_path / "edge-alerts.yml")
    with (
        exporter(broker) as (_, url),
        running_prometheus(tmp_path / "prometheus", [target_of(url)], rules=[rules]) as prom,
    ):
        prom.wait_up()
        prom.wait(lambda: len(prom.query("edge_fleet_device_online == 1")) == 2, "both online")
        prom.wait(lambda: prom.query("edge_fleet_model_inferences_total"), "health scraped")
        # A healthy fleet pages no one: once the first scrapes are in (EdgeExporterBlind's
        # absent() holds until then), no alert at all is firing.
        prom.wait(lambda: not [a for a in prom.alerts() if a["state"] == "firing"],
                  "no alert firing on a healthy fleet", timeout=20)  # fmt: skip

        # The broker publishes a-2's last will: offline.
        doomed.kill()

        # Probation rolls a version that fails real requests back.
        rows = [[12.0, 3.0, 4.0, 1.2]]  # valid, and outside the range the bad graph takes
        for _ in range(20):  # the previous version's figures
            assert watcher.request("POST", "/predict", {"features": rows})[0] == 200
        bad = fails_on_large_first_feature(iris_package_v2, tmp_path / "bad", keypair)
        publish(operator(broker), bad, fleet="f1", devices=["a-1"], key=keypair.key)
        wait_event(events, "activated", device="a-1", version="1.1.0")
        for _ in range(12):
            assert watcher.request("POST", "/predict", {"features": rows})[0] >= 400
        wait_event(events, "rolled_back", device="a-1", timeout=20)
        rolled = prom.wait(lambda: prom.firing("EdgeModelRolledBack"), "EdgeModelRolledBack")
        assert [(a["fleet"], a["model"], a["version"]) for a in rolled] == [("f1", "iris", "1.0.0")]

        # An operator's rollout plan (retained) says the rollout halted itself.
        halted = plan(fleet="f1", state="halted", reason="rolled_back 50.0% > 1% (1 of 2)")
        client = broker.client()
        client.publish("edge/fleets/f1/models/iris/rollout", json.dumps(halted).encode(),
                       qos=1, retain=True).wait_for_publish(5)  # fmt: skip
        prom.wait(lambda: prom.firing("EdgeRolloutHalted"), "EdgeRolloutHalted")
        alert = next(a for a in prom.alerts() if a["labels"]["alertname"] == "EdgeRolloutHalted")
        assert (alert["labels"]["fleet"], alert["labels"]["version"]) == ("f1", "1.4.0")
        assert (
            "stopped itself: rolled_back 50.0% > 1% (1 of 2)."
            in alert["annotations"]["description"]
        )

        offline = prom.wait(lambda: prom.firing("EdgeDeviceOffline"), "EdgeDeviceOffline")
        assert [(a["fleet"], a["device"]) for a in offline] == [("f1", "a-2")]
        # One device of two is not a fleet outage (that needs at least two).
        assert not prom.firing("EdgeFleetDevicesOffline")
        client.loop_stop()
        client.disconnect()
