"""`edge-fleet list` and `edge-fleet history` against a real mosquitto.

The desired state is written by the real publisher (`fleet.publish`: publish, rollout,
rollback, signed packages); rollout plans and a `where` block, which other commands
write, are retained here in the documented shapes. The reading account is a read-only
one where it matters: neither command may need to publish.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main
from fleet.publish import publish, rollback, rollout
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker, Creds
from tests.fixtures.models import Keypair
from tests.fleet.test_status import broker_args
from tests.fleet.test_status import publish as retain

pytestmark = pytest.mark.timeout(120)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def reader_args(broker: Broker, creds: Creds) -> list[str]:
    return ["--broker", broker.operator_url, "--username", creds.username,
            "--password-file", str(creds.password_file)]  # fmt: skip


@pytest.fixture
def published(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path
) -> dict[str, Any]:
    """north: iris 1.0.0 then 1.1.0 at 30 %, then rolled back to 1.0.0; south: 1.1.0;
    pi-7 (a device of north) pinned to 1.0.0."""
    ops = operator(broker)
    retain(broker.client(), "edge/devices/pi-7/status",
           {"device": "pi-7", "fleet": "north", "state": "online", "models": {}}, retain=True)  # fmt: skip
    publish(ops, iris_package, fleet="north", key=keypair.key, chunk_size=4096)
    publish(ops, iris_package_v2, fleet="north", key=keypair.key, chunk_size=4096, percent=10)
    widened = rollout(ops, "iris", fleet="north", percent=30, key=keypair.key)
    back = rollback(ops, "iris", fleet="north", key=keypair.key)
    (south,) = publish(ops, iris_package_v2, fleet="south", key=keypair.key, chunk_size=4096)
    (pinned,) = publish(
        ops, iris_package, fleet="north", devices=["pi-7"], key=keypair.key, chunk_size=4096
    )
    return {"widened": widened, "back": back, "south": south, "pinned": pinned}


def test_list_shows_each_fleet_and_device_override(
    broker: Broker, published: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    viewer = broker.add_reader("viewer")
    code, out, err = run(capsys, "list", "--json", *reader_args(broker, viewer))
    assert code == 0, err
    rows = json.loads(out)["desired"]
    got = [
        (r["scope"], r["fleet"], r["device"], r["version"], r["serial"], r["percent"]) for r in rows
    ]
    back, south, pinned = published["back"], published["south"], published["pinned"]
    assert got == [
        ("fleet", "north", None, "1.0.0", back["serial"], 100.0),
        ("device", "north", "pi-7", "1.0.0", pinned["serial"], None),
        ("fleet", "south", None, "1.1.0", south["serial"], 100.0),
    ]
    assert rows[0]["issued_at"] == back["issued_at"]
    assert rows[0]["sha256"] == back["artifact"]["sha256"]
    assert rows[0]["rollout_plan"] is None

    code, out, _ = run(capsys, "list", *reader_args(broker, viewer))
    lines = out.splitlines()
    assert lines[0].split() == ["TARGET", "MODEL", "VERSION", "SERIAL", "PERCENT", "WHERE",
                                "ISSUED", "PLAN"]  # fmt: skip
    assert lines[1].split()[:5] == ["north", "iris", "1.0.0", str(back["serial"]), "100%"]
    assert lines[2].split()[:4] == ["pi-7", "(device)", "iris", "1.0.0"]
    assert max(len(line) for line in lines) <= 80

    code, out, _ = run(capsys, "list", "--json", "--fleet", "south", *reader_args(broker, viewer))
    assert [r["fleet"] for r in json.loads(out)["desired"]] == ["south"]


def test_list_shows_where_tags_and_the_rollout_plan(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    client = broker.client()
    manifest = {"name": "iris", "version": "1.4.0", "serial": 12,
                "issued_at": "2026-05-01T12:00:00.000Z",
                "artifact": {"file": "model.onnx", "size": 1, "sha256": "cd" * 32},
                "rollout": {"percent": 10, "salt": "north/iris", "where": {"ring": "canary"}}}  # fmt: skip
    retain(client, "edge/fleets/north/models/iris/desired", manifest, retain=True)
    plan = {"schema": 1, "fleet": "north", "model": "iris", "version": "1.4.0",
            "steps": [1, 10, 50, 100], "every_s": 600, "step": 1, "percent": 10,
            "state": "halted", "reason": "rejected 3% > 2%", "where": {"ring": "canary"},
            "started_at": "2026-05-01T12:00:00.000Z"}  # fmt: skip
    retain(client, "edge/fleets/north/models/iris/rollout", plan, retain=True)
    # Garbage beside it is left out, not fatal.
    retain(client, "edge/fleets/north/models/wine/desired", b"{not json", retain=True)
    retain(client, "edge/fleets/west/models/iris/rollout", {"state": 3, "steps": "x"}, retain=True)
    code, out, err = run(capsys, "list", "--json", *broker_args(broker))
    assert code == 0, err
    north, west = json.loads(out)["desired"]
    assert north["where"] == {"ring": "canary"} and north["percent"] == 10.0
    assert north["rollout_plan"]["state"] == "halted"
    assert north["rollout_plan"]["reason"] == "rejected 3% > 2%"
    assert (west["fleet"], west["version"], west["rollout_plan"]["state"]) == ("west", None, None)
    code, out, _ = run(capsys, "list", *broker_args(broker))
    lines = out.splitlines()
    assert lines[1].split()[:6] == ["north", "iris", "1.4.0", "12", "10%", "ring=canary"]
    assert lines[1].endswith("halted 2/4")
    assert "north iris: rollout halted: rejected 3% > 2%" in lines


def test_history_is_newest_first_and_marks_the_desired_entry(
    broker: Broker, published: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    viewer = broker.add_reader("viewer")
    code, out, err = run(capsys, "history", "iris", "--fleet", "north", "--json",
                         *reader_args(broker, viewer))  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["history"]
    back, widened = published["back"], published["widened"]
    # The rollback re-signed 1.0.0 (its entry moved up with the new serial); 1.1.0 keeps
    # the serial of its last re-signing (the 30 % rollout).
    assert [(r["version"], r["serial"], r["desired"]) for r in rows] == [
        ("1.0.0", back["serial"], True),
        ("1.1.0", widened["serial"], False),
    ]
    assert rows[0]["sha256"] == back["artifact"]["sha256"]
    code, out, _ = run(capsys, "history", "iris", "--fleet", "north", *reader_args(broker, viewer))
    lines = out.splitlines()
    assert lines[0].split() == ["TARGET", "MODEL", "VERSION", "SERIAL", "ISSUED", "AT",
                                "SHA256", "DESIRED"]  # fmt: skip
    assert lines[1].split()[-2:] == [back["artifact"]["sha256"][:12], "*"]
    assert lines[2].split()[-1] == widened["artifact"]["sha256"][:12]

    # Without a target: every fleet's and device's history of the model.
    code, out, _ = run(capsys, "history", "iris", "--json", *broker_args(broker))
    targets = [
        (r["scope"], r["fleet"] or r["device"], r["version"]) for r in json.loads(out)["history"]
    ]
    assert targets == [("fleet", "north", "1.0.0"), ("fleet", "north", "1.1.0"),
                       ("fleet", "south", "1.1.0"), ("device", "pi-7", "1.0.0")]  # fmt: skip


def test_history_of_nothing_says_so_and_exits_0(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "history", "iris", "--device", "pi-1", *broker_args(broker))
    assert (code, out) == (0, "")
    assert err.strip() == f"no history of iris for device pi-1 on {broker.operator_url}"


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--fleet", "#"],
        ["history", "iris", "--fleet", "a", "--device", "b"],
        ["history", "ir/is"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
