"""Desired state -> what this device should do about it: a pure function, no broker.

The delivery worker feeds it the manifest it took (the device's own desired state wins
over the fleet's), the store's active pointer and last accepted serial; the answer is a
``Decision``. Tested on plain values in tests/agent/updates/test_plan.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.wire.errors import ManifestInvalid, ReplayedSerial
from agent.wire.manifest import Manifest
from agent.wire.topics import rollout_bucket

FLEET, DEVICE = "fleet", "device"
SOURCES = (DEVICE, FLEET)  # in order of precedence

INSTALL = "install"  # download (or take from the store) and install
CURRENT = "current"  # already serving exactly this manifest
ACCEPTED = (
    "accepted"  # this serial was accepted before (a probation rollback since keeps the older)
)
OUTSIDE = "not_in_rollout"  # a fleet rollout this device's bucket is not in


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


def rollout_of(manifest: Manifest) -> tuple[float, str] | None:
    """The signed manifest's ``rollout`` block as (percent, salt); None means everyone."""
    rollout: Any = manifest.raw.get("rollout")
    if rollout is None:
        return None
    if not isinstance(rollout, dict):
        raise ManifestInvalid(f"rollout: expected an object, got {rollout!r:.60}")
    percent, salt = rollout.get("percent", 100), rollout.get("salt", "")
    if not isinstance(percent, int | float) or isinstance(percent, bool) or not 0 <= percent <= 100:
        raise ManifestInvalid(f"rollout.percent: expected 0..100, got {percent!r}")
    if not isinstance(salt, str):
        raise ManifestInvalid(f"rollout.salt: expected a string, got {salt!r}")
    return float(percent), salt


def decide(
    manifest: Manifest,
    source: str,
    device: str,
    *,
    active: tuple[str, int] | None,
    last_serial: int,
) -> Decision:
    """What to do with a desired manifest whose signature has been checked.

    ``active`` is the (version, serial) the store points at, ``last_serial`` the last
    serial accepted for the name (-1: none). Raises ReplayedSerial for an old serial.
    """
    if source == FLEET:
        rollout = rollout_of(manifest)
        if rollout is not None:
            percent, salt = rollout
            bucket = rollout_bucket(salt, device)
            if not bucket < percent:
                return Decision(OUTSIDE, f"not in rollout (bucket {bucket} >= {percent:g}%)")
    if active == (manifest.version, manifest.serial):
        return Decision(CURRENT, f"already serving {manifest.version} (serial {manifest.serial})")
    if manifest.serial == last_serial:
        return Decision(ACCEPTED, f"serial {manifest.serial} was accepted before")
    if manifest.serial < last_serial:
        raise ReplayedSerial(manifest.name, manifest.serial, last_serial)
    return Decision(INSTALL)
