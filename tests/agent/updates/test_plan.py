"""The desired-state plan, on plain values: no broker, no store, no thread."""

from __future__ import annotations

from typing import Any

import pytest

from agent.updates import plan
from agent.wire.errors import ManifestInvalid, ReplayedSerial
from agent.wire.manifest import Manifest, parse_manifest
from agent.wire.topics import rollout_bucket


def manifest(serial: int = 5, version: str = "1.1.0", **extra: Any) -> Manifest:
    return parse_manifest({
        "name": "iris", "version": version, "serial": serial,
        "issued_at": "2026-01-01T00:00:00.000Z",
        "artifact": {"file": "model.onnx", "size": 10, "sha256": "a" * 64},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}],
        **extra,
    })  # fmt: skip


def test_the_devices_own_desired_state_wins_over_the_fleets() -> None:
    assert plan.effective({"fleet": b"F", "device": b"D"}) == (b"D", "device")
    assert plan.effective({"fleet": b"F"}) == (b"F", "fleet")
    assert plan.effective({}) is None


def test_a_new_serial_is_installed() -> None:
    decision = plan.decide(manifest(), "fleet", "pi-1", active=("1.0.0", 4), last_serial=4)
    assert decision.action == plan.INSTALL


def test_what_is_served_already_is_left_alone() -> None:
    decision = plan.decide(manifest(), "fleet", "pi-1", active=("1.1.0", 5), last_serial=5)
    assert decision.action == plan.CURRENT


def test_an_accepted_serial_is_not_retried_after_a_rollback() -> None:
    decision = plan.decide(manifest(), "fleet", "pi-1", active=("1.0.0", 5), last_serial=5)
    assert decision.action == plan.ACCEPTED


def test_an_old_serial_is_a_replay() -> None:
    with pytest.raises(ReplayedSerial, match=r"serial 5 for 'iris' is not above .* 9") as info:
        plan.decide(manifest(), "fleet", "pi-1", active=("1.0.0", 9), last_serial=9)
    # It says what to do: the publisher signs a new serial above every retained one.
    assert "; publish it again: `edge-fleet publish PACKAGE`" in str(info.value)
    assert "signs a new serial above every one retained" in str(info.value)


def test_a_device_outside_the_rollout_is_told_its_bucket() -> None:
    salt = "north/iris"
    inside = next(d for d in (f"pi-{i}" for i in range(100)) if rollout_bucket(salt, d) < 50)
    outside = next(d for d in (f"pi-{i}" for i in range(100)) if rollout_bucket(salt, d) >= 50)
    m = manifest(rollout={"percent": 50, "salt": salt})
    assert plan.decide(m, "fleet", inside, active=None, last_serial=-1).action == plan.INSTALL
    decision = plan.decide(m, "fleet", outside, active=None, last_serial=-1)
    assert decision.action == plan.OUTSIDE
    assert decision.reason == f"not in rollout (bucket {rollout_bucket(salt, outside)} >= 50%)"
    # A device's own desired state is not a fleet rollout.
    assert plan.decide(m, "device", outside, active=None, last_serial=-1).action == plan.INSTALL


def test_a_rollout_where_takes_only_devices_with_every_tag() -> None:
    m = manifest(rollout={"percent": 100, "salt": "north/iris", "where": {"ring": "canary"}})
    canary = plan.decide(m, "fleet", "pi-1", active=None, last_serial=-1, tags={"ring": "canary"})
    assert canary.action == plan.INSTALL
    stable = plan.decide(m, "fleet", "pi-2", active=("1.0.0", 4), last_serial=4,
                         tags={"ring": "stable", "site": "x"})  # fmt: skip
    assert stable == plan.Decision(
        plan.OUTSIDE, "not in rollout (tag ring=canary wanted, device has ring=stable)"
    )
    untagged = plan.decide(m, "fleet", "pi-3", active=None, last_serial=-1)
    assert untagged.reason == "not in rollout (tag ring=canary wanted, device has no ring tag)"
    # A device's own desired state carries no rollout: its tags do not matter.
    assert plan.decide(m, "device", "pi-3", active=None, last_serial=-1).action == plan.INSTALL


@pytest.mark.parametrize(
    ("rollout", "message"),
    [("half", "rollout: expected an object"), ({"percent": 101}, "rollout.percent: expected 0..100"),
     ({"percent": 5, "salt": 3}, "rollout.salt: expected a string"),
     ({"percent": 5, "where": {"ring": ""}}, "rollout.where.ring: '' is not a plain name")],
)  # fmt: skip
def test_a_malformed_rollout_is_refused(rollout: Any, message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        plan.decide(manifest(rollout=rollout), "fleet", "pi-1", active=None, last_serial=-1)


def test_a_canary_is_held_beside_the_active_version_and_its_percent_checked() -> None:
    decision = plan.decide(manifest(canary_traffic=10), "fleet", "pi-1", active=("1.0.0", 4),
                           last_serial=4)  # fmt: skip
    assert decision.action == plan.CANARY and "10%" in decision.reason
    itself = plan.decide(manifest(canary_traffic=10, version="1.0.0"), "fleet", "pi-1",
                         active=("1.0.0", 4), last_serial=4)  # fmt: skip
    assert itself.action == plan.CURRENT and "no canary of itself" in itself.reason
    with pytest.raises(ReplayedSerial):
        plan.decide(manifest(serial=3, canary_traffic=10), "fleet", "pi-1", active=("1.0.0", 4),
                    last_serial=4)  # fmt: skip
    for bad in (0, 100, -1, "10", True):
        with pytest.raises(
            ManifestInvalid, match=r"canary_traffic: expected a percent 0 < p < 100"
        ):
            manifest(canary_traffic=bad)
    with pytest.raises(ManifestInvalid, match="a shadow candidate serves no traffic"):
        manifest(canary_traffic=10, shadow=True)
