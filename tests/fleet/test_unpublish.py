"""``edge-fleet unpublish``: the desired state and the rollout plan cleared, the history
kept, devices left running what they run (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from tests.delivery_helpers import device_config, predict_version
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, desired, retain, retained

DESIRED = "edge/fleets/f1/models/iris/desired"
PLAN = "edge/fleets/f1/models/iris/rollout"
HISTORY = "edge/fleets/f1/models/iris/history"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_unpublish_clears_desired_and_plan_keeps_history_and_devices_keep_serving(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    unpublish = cli(broker, None, "unpublish", "iris", "--fleet", "f1")
    assert main(unpublish) == 1
    assert (
        "iris: nothing is published for fleet f1; nothing to unpublish (published for: nowhere)"
    ) in capsys.readouterr().err
    agent = start_agent(device_config(broker, keypair, "up-0"))
    for package in (iris_package, iris_package_v2):
        assert main(cli(broker, keypair, "publish", str(package), "--fleet", "f1")) == 0
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.1.0", timeout=30)
    retain(broker, PLAN, json.dumps({"schema": 1, "fleet": "f1", "model": "iris"}).encode())
    capsys.readouterr()

    assert main([*unpublish, "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert (doc["version"], doc["serial"], doc["cleared"]) == ("1.1.0", 2, [DESIRED, PLAN])
    assert doc["history_versions"] == ["1.0.0", "1.1.0"]
    assert "devices of fleet f1 keep running what they run" in err
    left = retained(broker, "edge/fleets/#")
    assert set(left) == {HISTORY}  # desired and plan cleared, the history kept
    # The device hears the desired state go and keeps serving what it has.
    agent.wait_for(
        lambda s: not s["desired"].get("iris", {}).get("sources", {}).get("fleet"), timeout=30
    )
    assert predict_version(agent) == "1.1.0"
    assert main(unpublish) == 1  # nothing left to unpublish

    # The history still serves a rollback: to the version before the one unpublished.
    assert main(cli(broker, keypair, "rollback", "iris", "--fleet", "f1")) == 0
    assert "rolled back to 1.0.0 for fleet f1 (serial 3, from 1.1.0, which was unpublished)" in (
        capsys.readouterr().out
    )
    agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.0.0", timeout=30)
    assert desired(broker)["serial"] == 3


def test_unpublish_of_a_device_says_where_it_goes_back_to(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fleet.publish_helpers import retain_status

    retain_status(broker, "pi-7", "north")
    main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "north", "--device", "pi-7"))
    capsys.readouterr()
    assert main(cli(broker, None, "unpublish", "iris", "--fleet", "north")) == 1
    assert "(published for: device pi-7)" in capsys.readouterr().err
    assert main(cli(broker, None, "unpublish", "iris", "--device", "pi-7")) == 0
    out, err = capsys.readouterr()
    assert "iris: unpublished 1.0.0 for device pi-7; history kept (1 versions)" in out
    assert "it takes fleet north's desired state again once that is re-signed" in err
    assert retained(broker, "edge/devices/pi-7/models/iris/desired") == {}
    assert main(cli(broker, None, "unpublish", "iris")) == 2
