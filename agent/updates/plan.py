"""Desired state -> what this device should do about it: a pure function, no broker.

The delivery worker feeds it the manifest it took (the device's own desired state wins
over the fleet's), the store's active pointer and last accepted serial; the answer is a
``Decision``. Tested on plain values in tests/agent/updates/test_plan.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.wire.errors import ReplayedSerial
from agent.wire.manifest import Manifest
from agent.wire.targeting import Rollout, outside, parse_rollout

FLEET, DEVICE = "fleet", "device"
SOURCES = (DEVICE, FLEET)  # in order of precedence

INSTALL = "install"  # download (or take from the store) and install
CURRENT = "current"  # already serving exactly this manifest
ACCEPTED = (
    "accepted"  # this serial was accepted before (a probation rollback since keeps the older)
)
OUTSIDE = "not_in_rollout"  # a fleet rollout whose tags or bucket leave this device out
SHADOW = "shadow"  # install beside the active version, compare on sampled requests, never serve
CANARY = "canary"  # install beside the active version and serve a share of the requests


# An old signed manifest retained (or replayed): the publisher signs a new serial.
REPLAY_FIX = (
    "publish it again: `edge-fleet publish PACKAGE` (or `edge-fleet rollback MODEL --to "
    "VERSION` for an older version) signs a new serial above every one retained"
)


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str = ""


def effective(by_source: Mapping[str, bytes]) -> tuple[bytes, str] | None:
    """The payload that applies: the device's own desired state, else the fleet's."""
    for source in SOURCES:
        if source in by_source:
            return by_source[source], source
    return None


def rollout_of(manifest: Manifest) -> Rollout | None:
    """The signed manifest's ``rollout`` block; None means every device of the fleet."""
    return parse_rollout(manifest.raw.get("rollout"))


def decide(
    manifest: Manifest,
    source: str,
    device: str,
    *,
    active: tuple[str, int] | None,
    last_serial: int,
    tags: Mapping[str, str] | None = None,
) -> Decision:
    """What to do with a desired manifest whose signature has been checked.

    ``active`` is the (version, serial) the store points at, ``last_serial`` the last
    serial accepted for the name (-1: none), ``tags`` the device's (``device.tags``),
    which a fleet rollout's ``where`` must all match. Raises ReplayedSerial for an old
    serial.
    """
    if source == FLEET:
        rollout = rollout_of(manifest)
        if rollout is not None:
            reason = outside(rollout, device, tags or {})
            if reason is not None:
                return Decision(OUTSIDE, reason)
    if active == (manifest.version, manifest.serial):
        return Decision(CURRENT, f"already serving {manifest.version} (serial {manifest.serial})")
    if manifest.shadow or manifest.canary_traffic is not None:
        if manifest.serial < last_serial:
            raise ReplayedSerial(manifest.name, manifest.serial, last_serial, fix=REPLAY_FIX)
        if active is not None and active[0] == manifest.version:
            what = "shadow" if manifest.shadow else "canary"
            return Decision(CURRENT, f"{manifest.version} serves already: no {what} of itself")
        if manifest.canary_traffic is not None:
            return Decision(CANARY, f"canary {manifest.version} serves "
                            f"{manifest.canary_traffic:g}% (serial {manifest.serial})")  # fmt: skip
        # Never accepted as active: the serial stays the active one's, so the promotion
        # (the same version published again without --shadow) has a higher serial.
        return Decision(SHADOW, f"shadow of {manifest.version} (serial {manifest.serial})")
    if manifest.serial == last_serial:
        return Decision(ACCEPTED, f"serial {manifest.serial} was accepted before")
    if manifest.serial < last_serial:
        raise ReplayedSerial(manifest.name, manifest.serial, last_serial, fix=REPLAY_FIX)
    return Decision(INSTALL)
