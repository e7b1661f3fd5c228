"""Tags, ``--where`` and the trust guard between the real publisher and real agents.

The publisher's tests check what is signed; the agent's tests check what a device does
with a manifest they sign themselves. Here the two meet: `edge-fleet publish --where`
reaches two `edge-agent run` processes with different tags, and `publish --strict`
reads the keys the agents report in their retained status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.wire.signing import generate_keypair, key_id, load_public_key
from fleet.cli import main
from tests.delivery_helpers import device_config, serving
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.3)
    return value


def test_where_reaches_only_the_tagged_devices_and_a_rollout_can_drop_it(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    agents = {}
    for name, ring in (("tag-canary", "canary"), ("tag-stable", "stable")):
        config = device_config(broker, keypair, name, fleet="north")
        config["device"]["tags"] = {"ring": ring, "site": "north"}
        agents[name] = start_agent(config, packages=[iris_package])
    canary, stable = agents["tag-canary"], agents["tag-stable"]
    assert stable.status()["tags"] == {"ring": "stable", "site": "north"}

    args = cli(broker, keypair, "publish", str(iris_package_v2), "--fleet", "north",
               "--where", "ring=canary", "--strict")  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    until(lambda: serving(canary) == "1.1.0", "the canary on 1.1.0")

    def outside() -> str | None:
        m = stable.status()["models"]["iris"]
        return m.get("reason") if m.get("state") == "not_in_rollout" else None

    reason = until(outside, "the stable device outside the rollout")
    assert "tag ring=canary wanted, device has ring=stable" in reason
    assert serving(stable) == "1.0.0"

    # The whole fleet: the same version, the selection dropped.
    args = cli(broker, keypair, "rollout", "iris", "--fleet", "north", "--percent", "100",
               "--no-where")  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    until(lambda: serving(stable) == "1.1.0", "the stable device on 1.1.0")
    assert serving(canary) == "1.1.0"


def test_strict_publish_refuses_a_key_the_running_agents_do_not_trust(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    agent = start_agent(device_config(broker, keypair, "trust-1", fleet="south"), packages=[])
    trusted = key_id(load_public_key(keypair.pub))
    until(lambda: agent.status().get("trusted_keys") == [trusted], "the agent's trusted keys")
    other_key, _pub = generate_keypair(tmp_path / "other")
    other = Keypair(key=other_key, pub=_pub)
    # The agent's retained status (not a test's) is what the guard reads.
    args = cli(broker, other, "publish", str(iris_package), "--fleet", "south", "--strict")
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"no device of fleet south trusts signing key {key_id(load_public_key(_pub))}" in err
    assert trusted in err
    assert serving(agent) is None  # nothing was published
