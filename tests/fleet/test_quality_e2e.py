"""Issue 16's end-to-end test: a shadow candidate judged on the device's own traffic.

Real mosquitto, a real agent, real onnxruntime models, the real ``edge-fleet``. The
bad candidate disagrees with the active version wherever x2 > 0.8 and the traffic runs
through that region (which also moves x2 away from the training sample): the device's
health names the disagreement and x2's drift, and a rollout step with
``--promote-if "agreement>=0.97 over 400"`` refuses to promote it. A good candidate,
compared the same way, is promoted and serves.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.publish import publish
from tests.agent.quality.test_shadow_e2e import health_where, quality_agent
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fixtures.quality import region_rows
from tests.fleet.test_rollouts_e2e import EDGE_FLEET, env, fleet_cli

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PLAN = "edge/fleets/f1/models/region/rollout"
DESIRED = "edge/fleets/f1/models/region/desired"
PROMOTE_IF = "agreement>=0.97 over 400"


def compared(health: Any, version: str, rows: int) -> dict[str, Any]:
    """The first health report whose shadow section compared ``rows`` rows of ``version``."""

    def enough(report: dict[str, Any]) -> bool:
        shadow = report["models"].get("region", {}).get("shadow") or {}
        return shadow.get("version") == version and shadow.get("compared", 0) >= rows

    return health_where(health, enough)


def wait_line(log: Path, text: str, timeout: float = 30) -> str:
    """The first line of the follower's log holding ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if text in line:
                return line
        time.sleep(0.2)
    raise AssertionError(f"no line with {text!r} in {log}:\n{log.read_text()}")


def drive(agent: Any, batches: int, seed: int) -> None:
    for i in range(batches):
        rows = region_rows(20, inside=True, seed=seed + i).tolist()
        code, body = agent.request("POST", "/predict", {"features": rows})
        assert code == 200, body


def test_shadow_report_drift_and_promote_if_refusing_then_promoting(
    broker: Broker, keypair: Keypair, start_agent: Callable[..., Any], tmp_path: Path,
    region_active: Path, region_bad: Path, region_good: Path,
) -> None:  # fmt: skip
    agent = quality_agent(broker, keypair, start_agent, "q-1", region_active)
    publish(operator(broker), region_active, fleet="f1", key=keypair.key)
    health = broker.subscribe("edge/devices/q-1/health")
    plan_log, desired_log = broker.subscribe(PLAN), broker.subscribe(DESIRED)

    # --- a candidate that disagrees on the region -----------------------------------------
    publish(operator(broker), region_bad, fleet="f1", key=keypair.key, shadow=True)
    agent.wait_for(
        lambda s: (s["models"]["region"].get("shadow") or {}).get("version") == "1.1.0", 30
    )
    drive(agent, 30, seed=0)
    report = compared(health, "1.1.0", 600)
    shadow, drift = report["models"]["region"]["shadow"], report["models"]["region"]["drift"]
    assert shadow["agreement"] < 0.1, shadow
    assert {(a, c) for a, c, _ in shadow["confusion"][:2]} == {("hi", "lo"), ("lo", "hi")}
    assert drift["top"][0]["feature"] == "x2", drift
    assert all(t["psi"] < drift["top"][0]["psi"] / 5 for t in drift["top"][1:]), drift
    # The retained status carries the figures the rollout weighs.
    agent.wait_for(lambda s: (s["models"]["region"]["shadow"] or {}).get("compared", 0) >= 600, 15)
    # The operator's view: the shadow report names the disagreement, per device and fleet.
    shown = subprocess.run(
        [EDGE_FLEET, "shadow-report", "region", "--wait", "3"], env={**env(broker, keypair),
        "COLUMNS": "160"}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "q-1" in shown.stdout and "1.1.0" in shown.stdout, shown.stdout
    assert "disagreements (active -> candidate): " in shown.stdout, shown.stdout
    assert "hi -> lo" in shown.stdout and "lo -> hi" in shown.stdout, shown.stdout

    made = fleet_cli(broker, keypair, "region", "--fleet", "f1", "--steps", "100", "--every", "1s",
                     "--halt-if", "rejected>0", "--promote-if", PROMOTE_IF, "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    log = tmp_path / "follower.log"
    with log.open("ab") as out:
        follower = subprocess.Popen(
            [EDGE_FLEET, "rollout", "--follow", "--poll", "0.5"], env=env(broker, keypair),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        said = wait_line(log, "not promoted: step 1/1 (100%): waiting for " + PROMOTE_IF)
        assert "agreement " in said and "< 0.97 over 400" in said, said
        plan = [json.loads(m.payload) for m in plan_log.messages if m.payload][-1]
        assert plan["state"] == "running" and plan["version"] == "1.1.0", plan
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(15)
    last = [json.loads(m.payload) for m in desired_log.messages if m.payload][-1]
    assert last["version"] == "1.1.0" and last["shadow"] is True  # never promoted
    assert agent.status()["models"]["region"]["version"] == "1.0.0"

    # The operator gives up on it: the plan stops, the candidate stays in shadow.
    aborted = fleet_cli(broker, keypair, "region", "--fleet", "f1", "--abort", "--json")
    assert aborted.returncode == 0, aborted.stderr

    # --- a good candidate: compared the same way, promoted, serving --------------------------
    publish(operator(broker), region_good, fleet="f1", key=keypair.key, shadow=True)
    agent.wait_for(
        lambda s: (s["models"]["region"].get("shadow") or {}).get("version") == "1.2.0", 30
    )
    drive(agent, 30, seed=1000)
    good = compared(health, "1.2.0", 600)["models"]["region"]["shadow"]
    assert good["agreement"] >= 0.97, good
    agent.wait_for(lambda s: (s["models"]["region"]["shadow"] or {}).get("compared", 0) >= 600, 15)
    done = fleet_cli(broker, keypair, "region", "--fleet", "f1", "--steps", "100", "--every", "1s",
                     "--halt-if", "rejected>0", "--promote-if", PROMOTE_IF, "--follow",
                     "--poll", "0.5", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr + log.read_text()
    plan = json.loads(done.stdout)
    assert (plan["state"], plan["version"]) == ("done", "1.2.0"), plan
    assert "done at step 1/1" in plan["reason"], plan
    last = [json.loads(m.payload) for m in desired_log.messages if m.payload][-1]
    assert last["version"] == "1.2.0" and "shadow" not in last
    status = agent.wait_for(lambda s: s["models"]["region"]["version"] == "1.2.0", 30)
    assert "shadow" not in status["models"]["region"]
    code, body = agent.request(
        "POST", "/predict", {"features": region_rows(1, inside=True).tolist()}
    )
    assert code == 200 and body["version"] == "1.2.0"
