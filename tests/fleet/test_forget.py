"""`edge-fleet forget` against a real mosquitto: what it clears, what it refuses, what it says."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from fleet.cli import main
from fleet.state import read_retained
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker
from tests.fleet.test_status import broker_args, publish, run_status, status_payload

pytestmark = pytest.mark.timeout(120)
MANIFEST = {"name": "iris", "version": "1.2.0", "serial": 4}
KEPT = {
    "edge/devices/pi-1/status",
    "edge/devices/pi-30/status",  # a name that starts like pi-3's
    "edge/fleets/north/models/iris/desired",
}


@pytest.fixture
def held(broker: Broker) -> Iterator[Broker]:
    """pi-1 online; pi-3 offline with its own desired state, history and enrolment."""
    c = broker.client()
    publish(c, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    publish(c, "edge/devices/pi-30/status", status_payload("pi-30", "north"), retain=True)
    publish(c, "edge/devices/pi-3/status", status_payload("pi-3", "north", "offline"), retain=True)
    publish(c, "edge/devices/pi-3/models/iris/desired", MANIFEST, retain=True)
    publish(c, "edge/devices/pi-3/models/iris/history", {"entries": [MANIFEST]}, retain=True)
    publish(c, "edge/devices/pi-3/enrolment",
            {"device": "pi-3", "fleet": "north", "tags": {}, "enrolled_at": "2026-05-01T12:00:00Z"},
            retain=True)  # fmt: skip
    publish(c, "edge/fleets/north/models/iris/desired", MANIFEST, retain=True)
    c.disconnect()
    c.loop_stop()
    yield broker


def retained(broker: Broker) -> set[str]:
    t = "edge"
    return set(read_retained(operator(broker), [f"{t}/devices/#", f"{t}/fleets/#"], purpose="t"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_forget_clears_every_retained_topic_of_the_device_and_says_so(
    held: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "forget", "pi-3", *broker_args(held))
    assert code == 0, err
    assert out == "pi-3: cleared enrolment, models/iris/desired, models/iris/history, status\n"
    assert "broker accounts are untouched: remove each with broker-config/mkcreds.sh remove" in err
    assert retained(held) == KEPT
    _, out, _ = run_status(capsys, "--json", "--wait", "0.2", *broker_args(held))
    assert [d["device"] for d in json.loads(out)["devices"]] == ["pi-1", "pi-30"]
    # Again: nothing is left to forget, and a typo must not pass as success.
    code, _, err = run(capsys, "forget", "pi-3", *broker_args(held))
    assert code == 1
    assert "pi-3: nothing retained under edge/devices/ID/" in err


def test_an_online_device_is_refused_unless_forced(
    held: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "forget", "pi-3", "pi-1", *broker_args(held))
    assert (code, out) == (1, "")
    assert err.startswith("edge-fleet: error: pi-1: online")
    assert "publishes its status again" in err and "--force" in err
    assert err.count("\n") == 1
    assert "edge/devices/pi-3/status" in retained(held)  # nothing at all was cleared

    code, out, err = run(capsys, "forget", "pi-1", "--force", "--json", *broker_args(held))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["devices"] == [
        {"device": "pi-1", "online": True, "cleared": ["edge/devices/pi-1/status"]}
    ]
    assert any("pi-1 was online" in n for n in doc["notes"])
    assert "edge/devices/pi-1/status" not in retained(held)


def test_dry_run_clears_nothing(held: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    before = retained(held)
    code, out, _ = run(capsys, "forget", "pi-3", "-n", *broker_args(held))
    assert code == 0
    assert out.startswith("pi-3: would clear enrolment, ")
    assert retained(held) == before


def test_unknown_devices_fail_after_the_known_ones_are_forgotten(
    held: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "forget", "pi-3", "pi-99", *broker_args(held))
    assert code == 1
    assert out.startswith("pi-3: cleared ")
    assert "pi-99: nothing retained" in err
    assert retained(held) == KEPT


def test_a_wildcard_is_not_a_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["forget", "+"])
    assert exc.value.code == 2
