"""``edge-fleet rollback MODEL --device ID``: the device's rollback command, its answer
printed, its refusal an exit 1 with its own words (issue 13). A real agent answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from tests.delivery_helpers import device_config, predict_version
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, retain_status


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rollback_of_one_device_goes_through_its_command(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    agent = start_agent(device_config(broker, keypair, "rbd-0"),
                        packages=[iris_package, iris_package_v2])  # fmt: skip
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)
    assert predict_version(agent) == "1.1.0"
    args = cli(broker, None, "rollback", "iris", "--device", "rbd-0")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("rbd-0: iris rolled back to 1.0.0 (edge-fleet rollback by operator)")
    assert predict_version(agent) == "1.0.0"

    # The device's refusal, in its own words, is the command's failure.
    assert main([*args, "--to", "7.0", "--json"]) == 1
    out, err = capsys.readouterr()
    assert "edge-fleet: error: device rbd-0: rollback: iris 7.0 is not installed" in err
    assert out == ""
    assert main([*args, "--to", "1.1.0", "--reason", "back again", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert (answer["ok"], answer["version"], answer["reason"]) == (True, "1.1.0", "back again")
    assert predict_version(agent) == "1.1.0"


def test_rollback_of_a_device_that_cannot_answer_fails_fast(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    retain_status(broker, "pi-1", "f1")  # online, but no agent behind it
    retain_status(broker, "pi-2", "f1", state="offline")
    assert main(cli(broker, None, "rollback", "iris", "--device", "pi-11")) == 1
    assert "device pi-11 is not known" in capsys.readouterr().err
    assert main(cli(broker, None, "rollback", "iris", "--device", "pi-2")) == 1
    assert "device pi-2 is offline since " in capsys.readouterr().err
    assert main(cli(broker, None, "rollback", "iris", "--device", "pi-1", "--timeout", "0.5")) == 1
    assert "device pi-1 did not answer the rollback command within 0.5 s" in capsys.readouterr().err
    # The fleet-level rollback needs a fleet and a key.
    assert main(cli(broker, None, "rollback", "iris")) == 2
