"""Self-driving rollouts end to end: real mosquitto, real agents, the real ``edge-fleet``.

Each test publishes the new version at 0% (``fleet.publish``), then runs
``edge-fleet rollout`` as an operator would: in the foreground with ``--follow``, or
as the follower service (``edge-fleet rollout --follow``), killed and restarted.
Steps hold for 2 s so a plan runs in seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.wire.package import read_manifest
from agent.wire.signing import load_private_key, sign_manifest
from agent.wire.topics import rollout_bucket
from fleet.publish import publish
from tests.delivery_helpers import device_config, operator, serving, wait_event
from tests.fixtures.broker import Broker, MessageLog
from tests.fixtures.models import Keypair

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

EDGE_FLEET = str(Path(sys.executable).with_name("edge-fleet"))
SALT = "f1/iris"
PLAN = "edge/fleets/f1/models/iris/rollout"
DESIRED = "edge/fleets/f1/models/iris/desired"


def names(inside: int, outside: int, percent: float = 50) -> list[str]:
    """Device ids: ``inside`` of them in ``percent`` of the salt (but not in 1%), then
    ``outside`` of them out of it."""
    ins = [n for n in (f"ro-{i}" for i in range(200)) if 1 <= rollout_bucket(SALT, n) < percent]
    outs = [n for n in (f"ro-{i}" for i in range(200)) if rollout_bucket(SALT, n) >= percent]
    return ins[:inside] + outs[:outside]


def env(broker: Broker, keypair: Keypair) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    out.update(
        EDGE_BROKER=broker.operator_url,
        EDGE_USERNAME=broker.operator.username,
        EDGE_PASSWORD_FILE=str(broker.operator.password_file),
        EDGE_SIGNING_KEY=str(keypair.key),
        PYTHONUNBUFFERED="1",
    )
    return out


def fleet_cli(
    broker: Broker, keypair: Keypair, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE_FLEET, "rollout", *args], env=env(broker, keypair), capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


def follower(broker: Broker, keypair: Keypair, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [EDGE_FLEET, "rollout", "--follow", "--poll", "0.5"], env=env(broker, keypair),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def plans(log: MessageLog) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in log.on(PLAN) if m.payload]


def wait_plan(log: MessageLog, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> Any:
    log.wait_for(lambda _m: any(pred(p) for p in plans(log)), timeout)
    return next(p for p in plans(log) if pred(p))


def percents(log: MessageLog, version: str) -> list[float]:
    """The percents the fleet's desired state of ``version`` was signed with, in order."""
    desired = [json.loads(m.payload) for m in log.on(DESIRED) if m.payload]
    return [d["rollout"]["percent"] for d in desired if d["version"] == version]


def bad_package(src: Path, dst: Path, keypair: Keypair) -> Path:
    """iris 1.2.0 whose parity vectors are wrong: every device rejects it. (Its artifact
    is not the fleet's current one, so the history keeps that as the rollback target.)"""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst).to_dict()
    manifest["version"] = "1.2.0"
    probs = np.asarray(manifest["parity"]["expected"]["probabilities"]) + 0.3
    manifest["parity"]["expected"]["probabilities"] = probs.tolist()
    (dst / "manifest.json").write_text(
        json.dumps(sign_manifest(manifest, load_private_key(keypair.key)))
    )
    return dst


def fleet_of(
    broker: Broker, keypair: Keypair, start_agent: Any, package: Path, devices: list[str]
) -> dict[str, Any]:
    """Agents serving ``package``, which is also the fleet's published desired state."""
    agents = {
        n: start_agent(device_config(broker, keypair, n), packages=[package]) for n in devices
    }
    publish(operator(broker), package, fleet="f1", key=keypair.key)
    return agents


def test_a_good_version_advances_step_by_step_to_everyone(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    devices = names(inside=2, outside=1)
    agents = fleet_of(broker, keypair, start_agent, iris_package, devices)
    events = broker.subscribe("edge/devices/+/events")
    plan_log, desired_log = broker.subscribe(PLAN), broker.subscribe(DESIRED)
    publish(operator(broker), iris_package_v2, fleet="f1", percent=0, key=keypair.key)

    done = fleet_cli(
        broker, keypair, "iris", "--fleet", "f1", "--steps", "1,50,100", "--every", "2s",
        "--halt-if", "rejected>0 or rolled_back>0", "--promote-if", "active>=100%",
        "--follow", "--poll", "0.5", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["state"], plan["percent"], plan["version"]) == ("done", 100, "1.1.0")
    assert plan["previous_version"] == "1.0.0" and "done at step 3/3" in plan["reason"]
    for agent in agents.values():
        agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    # Step by step, each percent signed once; the device outside 50% said so at 50%.
    assert percents(desired_log, "1.1.0") == [0, 1, 50, 100]
    assert [p["step"] for p in plans(plan_log)] == sorted(p["step"] for p in plans(plan_log))
    wait_event(events, "not_in_rollout", device=devices[2])
    assert "bucket" in wait_event(events, "not_in_rollout", device=devices[2])["reason"]


def test_a_bad_version_halts_and_stays_where_it_is(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    devices = names(inside=2, outside=1)
    agents = fleet_of(broker, keypair, start_agent, iris_package, devices)
    desired_log = broker.subscribe(DESIRED)
    bad = bad_package(iris_package_v2, tmp_path / "bad", keypair)
    publish(operator(broker), bad, fleet="f1", percent=0, key=keypair.key)

    halted = fleet_cli(
        broker, keypair, "iris", "--fleet", "f1", "--steps", "50,100", "--every", "2s",
        "--halt-if", "rejected>0%", "--follow", "--poll", "0.5", "--json",
    )  # fmt: skip
    assert halted.returncode == 1, halted.stderr
    plan = json.loads(halted.stdout)
    assert plan["state"] == "halted" and plan["percent"] == 50
    assert re.search(r"rejected [12]/2 = (50|100)% > 0%$", plan["reason"]), plan["reason"]
    assert "rollout halted" in halted.stderr.splitlines()[-1]
    # Halted: never widened, and the devices kept the version they had.
    assert percents(desired_log, "1.2.0") == [0, 50]
    assert all(serving(a) == "1.0.0" for a in agents.values())
    # --resume refuses nothing here (the artifact is still desired); --abort ends it.
    aborted = fleet_cli(broker, keypair, "iris", "--fleet", "f1", "--abort", "--json")
    assert aborted.returncode == 0, aborted.stderr
    assert json.loads(aborted.stdout)["state"] == "aborted"
    assert fleet_cli(broker, keypair, "iris", "--fleet", "f1", "--abort").returncode == 1


def test_rollback_on_halt_puts_the_fleet_back(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    devices = names(inside=1, outside=1)
    fleet_of(broker, keypair, start_agent, iris_package, devices)
    desired_log = broker.subscribe(DESIRED)
    bad = bad_package(iris_package_v2, tmp_path / "bad", keypair)
    publish(operator(broker), bad, fleet="f1", percent=0, key=keypair.key)

    halted = fleet_cli(
        broker, keypair, "iris", "--fleet", "f1", "--steps", "50,100", "--every", "2s",
        "--halt-if", "rejected>=1", "--rollback-on-halt", "--follow", "--poll", "0.5", "--json",
    )  # fmt: skip
    assert halted.returncode == 1, halted.stderr
    plan = json.loads(halted.stdout)
    assert plan["state"] == "halted" and not plan["rollback_pending"]
    assert plan["reason"].endswith("; rolled back to 1.0.0"), plan["reason"]
    desired_log.wait_for(lambda _m: json.loads(desired_log.on(DESIRED)[-1].payload)["version"]
                         == "1.0.0", 10)  # fmt: skip
    last = json.loads(desired_log.on(DESIRED)[-1].payload)
    assert last["rollout"]["percent"] == 100
    # Resuming needs the plan's artifact desired again: it says how.
    resumed = fleet_cli(broker, keypair, "iris", "--fleet", "f1", "--resume")
    assert resumed.returncode == 1
    assert "publish 1.2.0 again with --rollout 0, then --resume" in resumed.stderr


def test_a_killed_follower_restarted_resumes_and_two_never_double_advance(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    devices = names(inside=1, outside=1)
    agents = fleet_of(broker, keypair, start_agent, iris_package, devices)
    plan_log, desired_log = broker.subscribe(PLAN), broker.subscribe(DESIRED)
    publish(operator(broker), iris_package_v2, fleet="f1", percent=0, key=keypair.key)
    created = fleet_cli(
        broker, keypair, "iris", "--fleet", "f1", "--steps", "10,50,70,100", "--every", "2s",
        "--halt-if", "rejected>0 or rolled_back>0",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "running at step 1/4 (10%)" in created.stdout

    first = follower(broker, keypair, tmp_path / "follower-1.log")
    try:
        wait_plan(plan_log, lambda p: p["step"] == 1, timeout=30)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # Nobody drives it now: it stays where it is however long the step lasts.
    seen = len(plans(plan_log))
    time.sleep(3)
    assert len(plans(plan_log)) == seen
    stalled = plans(plan_log)[-1]["step"]

    # Restarted, and twice at once: they carry on from the broker's plan, one acting.
    pair = [follower(broker, keypair, tmp_path / f"follower-{i}.log") for i in (2, 3)]
    try:
        wait_plan(plan_log, lambda p: p["state"] == "done", timeout=60)
    finally:
        for proc in pair:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    steps = [p["step"] for p in plans(plan_log)]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2, 3} and stalled in steps
    revisions = [p["revision"] for p in plans(plan_log)]
    assert revisions == sorted(revisions)
    # Every percent signed exactly once, in order, although three followers took part.
    assert percents(desired_log, "1.1.0") == [0, 10, 50, 70, 100]
    for agent in agents.values():
        agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)


def test_sigterm_stops_the_follower_with_exit_0(
    broker: Broker, keypair: Keypair, tmp_path: Path
) -> None:
    # As PID 1 of its container (deploy/kubernetes/rollout.yaml) the follower only stops
    # on SIGTERM because it handles it: without the handler this process would die by
    # the signal (-15) here, and be ignored there until the kubelet's SIGKILL.
    plan_log = broker.subscribe("edge/fleets/+/models/+/rollout")
    proc = follower(broker, keypair, tmp_path / "follower.log")
    try:
        # Connected: the broker delivers nothing retained, so wait for its first poll turn.
        time.sleep(2)
        assert proc.poll() is None, (tmp_path / "follower.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, (tmp_path / "follower.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not plans(plan_log)
