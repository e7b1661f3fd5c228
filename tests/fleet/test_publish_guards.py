"""What ``publish`` and ``rollout`` say before they send anything (issue 13): a fleet or
device nobody knows (a typo), a signing key no targeted device trusts, a package
signed by another key. Warnings by default, refusals with ``--strict``.

Devices are made known the way they make themselves known: a retained status (as the
agent publishes it, ``trusted_keys`` and ``tags`` included) or an enrolment record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.wire.signing import generate_keypair, key_id, load_public_key
from fleet.cli import main
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import (
    cli,
    desired,
    retain_enrolment,
    retain_status,
    retained,
)


@pytest.fixture
def other_key(tmp_path: Path) -> Keypair:
    key, pub = generate_keypair(tmp_path / "other")
    return Keypair(key=key, pub=pub)


def kid(pair: Keypair) -> str:
    return key_id(load_public_key(pair.pub))


def test_an_unknown_fleet_is_warned_about_and_refused_with_strict(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    retain_status(broker, "pi-1", "warehouse")
    retain_enrolment(broker, "pi-2", "workshop")  # enrolled, never connected yet
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "warehose")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (
        "warning: fleet warehose is not known: no device's retained status or enrolment "
        "names it (known fleets: warehouse, workshop); publishing anyway (--strict refuses)"
    ) in err
    assert main([*args, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "fleet warehose is not known" in err and "nothing was published (--strict)" in err
    assert desired(broker, "warehose")["serial"] == 1  # the strict run sent nothing more
    # A fleet known only from an enrolment record is known: no warning.
    assert main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "workshop",
                    "--strict")) == 0  # fmt: skip
    assert "not known" not in capsys.readouterr().err


def test_an_unknown_device_is_named_with_the_closest_known_ones_first(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for device in ("pi-1", "pi-09", "cam-7"):
        retain_status(broker, device, "f1")
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1",
               "--device", "pi-099")  # fmt: skip
    assert main([*args, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "device pi-099 is not known: no retained status or enrolment names it" in err
    assert "(known devices: pi-09, " in err  # difflib's closest first
    assert retained(broker, "edge/devices/pi-099/#") == {}
    assert main(args) == 0
    assert "warning: device pi-099 is not known" in capsys.readouterr().err
    assert retained(broker, "edge/devices/pi-099/models/iris/desired")


def test_rollout_has_the_same_guard(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    retain_status(broker, "pi-1", "warehouse")
    main(
        cli(broker, keypair, "publish", str(iris_package), "--fleet", "warehose", "--rollout", "10")
    )
    capsys.readouterr()
    args = cli(broker, keypair, "rollout", "iris", "--fleet", "warehose", "--percent", "50")
    assert main([*args, "--strict"]) == 1
    assert "fleet warehose is not known" in capsys.readouterr().err
    assert desired(broker, "warehose")["rollout"]["percent"] == 10
    assert main(args) == 0
    assert "warning: fleet warehose is not known" in capsys.readouterr().err
    assert desired(broker, "warehose")["rollout"]["percent"] == 50


def test_a_package_signed_by_another_key_is_re_signed_out_loud(
    broker: Broker, keypair: Keypair, other_key: Keypair, iris_package: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    retain_status(broker, "pi-1", "f1")  # reports no keys: an older agent, no judgement
    assert main(cli(broker, other_key, "publish", str(iris_package), "--fleet", "f1")) == 0
    err = capsys.readouterr().err
    assert f"package signed by key {kid(keypair)}; re-signing with {kid(other_key)}" in err
    assert "trusts" not in err
    assert desired(broker)["signature"]["key_id"] == kid(other_key)


def test_a_key_no_device_of_the_fleet_trusts_is_said_and_refused_with_strict(
    broker: Broker, keypair: Keypair, other_key: Keypair, iris_package: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for device in ("pi-1", "pi-2"):
        retain_status(broker, device, "f1", trusted_keys=[kid(keypair)])
    args = cli(broker, other_key, "publish", str(iris_package), "--fleet", "f1")
    assert main([*args, "--strict"]) == 1
    err = capsys.readouterr().err
    assert (
        f"no device of fleet f1 trusts signing key {kid(other_key)} (they trust "
        f"{kid(keypair)}): all 2 that report their keys would reject it"
    ) in err
    assert retained(broker, "edge/fleets/#", "edge/artifacts/#") == {}
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: no device of fleet f1 trusts signing key {kid(other_key)}" in err
    doc = json.loads(out)
    assert doc["signing_key"] == kid(other_key) and doc["package_key"] == kid(keypair)
    assert any("trusts signing key" in w for w in doc["warnings"])
    # The key the devices trust: not a word.
    assert (
        main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--strict")) == 0
    )
    assert "warning" not in capsys.readouterr().err


def test_some_devices_not_trusting_the_key_are_named(
    broker: Broker, keypair: Keypair, other_key: Keypair, iris_package: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    retain_status(broker, "pi-1", "f1", trusted_keys=[kid(keypair), kid(other_key)])
    retain_status(broker, "pi-2", "f1", trusted_keys=[kid(keypair)])
    retain_status(broker, "pi-3", "f1", trusted_keys=[])  # checks no signature at all
    args = cli(broker, other_key, "publish", str(iris_package), "--fleet", "f1", "--strict")
    assert main(args) == 0  # some devices take it: a warning, not a refusal
    err = capsys.readouterr().err
    assert (
        f"1 of 3 devices do not trust signing key {kid(other_key)} and will reject it: pi-2" in err
    )
