"""Desired against actual, per device and model: the rollout's view of the fleet.

``classify`` is a pure function of what the broker retains: the desired manifests that
could apply to a device (its own and its fleet's, as dicts) and the device's retained
status (``fleet.state.DeviceState``). It answers one ``DeviceProgress``: which version
is desired and from where, whether the device is targeted (inside the rollout's percent
and ``where`` tags), what it runs and in which state, and why. ``summarize`` counts the
rows for the status line, the self-driving rollout's halt/promote conditions
(``fleet/expr.py``) and ``edge-fleet status``.

The device's own words come first: its retained ``models[name]`` carries ``state``,
``reason`` and ``desired: {version, serial, source, decision}``. Older agents say less
(no ``desired``, a refusal shown as ``active`` with a "refused" reason), so every field
is optional here and the classification falls back on version comparisons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.wire.topics import rollout_bucket

from fleet.state import DeviceState

FLEET, DEVICE = "fleet", "device"
SOURCES = (DEVICE, FLEET)  # in order of precedence, as agent/updates/plan.py weighs them

ACTIVE = "active"  # on the desired version
PROBATION = "probation"  # on the desired version, still on trial
UPDATING = "updating"  # targeted, not there yet (downloading, installing, not seen yet)
REJECTED = "rejected"  # the device refused the desired manifest
ROLLED_BACK = "rolled_back"  # the device took it and rolled it back (probation)
NOT_IN_ROLLOUT = "not_in_rollout"  # outside the percent or the where tags
OFFLINE = "offline"  # the retained status is the device's last will
UNKNOWN = "unknown"  # no status, or nothing desired
STATES = (ACTIVE, PROBATION, UPDATING, REJECTED, ROLLED_BACK, NOT_IN_ROLLOUT, OFFLINE, UNKNOWN)

# Device-side states that mean "on its way" (agent/models/registry.py and the spec's names).
_MOVING = {"updating", "downloading", "installing", "verified", "verifying"}
_REFUSED = {"rejected", "failed"}


@dataclass(frozen=True)
class DeviceProgress:
    device: str
    model: str
    state: str
    reason: str = ""
    desired_version: str | None = None
    desired_serial: int | None = None
    source: str | None = None  # "device" or "fleet": whose desired state applies
    targeted: bool = False  # the applicable desired state is meant for this device now
    version: str | None = None  # what the device serves (None: nothing)
    fleet: str | None = None
    # A --shadow desired version the device compares beside the one it serves: rows
    # compared and agreed so far (its retained models[name].shadow).
    shadow_compared: int = 0
    shadow_agreed: int = 0

    @property
    def on_desired(self) -> bool:
        return self.desired_version is not None and self.version == self.desired_version

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def targeting(manifest: Mapping[str, Any], device: str, tags: Mapping[str, Any]) -> str | None:
    """Why a fleet manifest's ``rollout`` leaves ``device`` out, or None when it is in.

    The reasons read as the agent's do: ``not in rollout (bucket 52 >= 50%)``,
    ``not in rollout (tag ring=canary wanted, device has ring=stable)``.
    """
    rollout = manifest.get("rollout")
    if not isinstance(rollout, Mapping):
        return None  # no rollout block: everyone
    where = rollout.get("where") or {}
    if isinstance(where, Mapping):
        for key in sorted(where):
            want, have = where[key], tags.get(key)
            if have != want:
                has = f"{key}={have}" if have is not None else f"no tag {key}"
                return f"not in rollout (tag {key}={want} wanted, device has {has})"
    percent = rollout.get("percent", 100)
    salt = rollout.get("salt", "")
    if not isinstance(percent, int | float) or isinstance(percent, bool):
        return None  # the device refuses such a manifest; not a targeting question
    bucket = rollout_bucket(str(salt), device)
    if not bucket < percent:
        return f"not in rollout (bucket {bucket} >= {percent:g}%)"
    return None


def applicable(desired: Mapping[str, Mapping[str, Any]]) -> tuple[str, Mapping[str, Any]] | None:
    """(source, manifest) that applies: the device's own desired state, else the fleet's."""
    for source in SOURCES:
        manifest = desired.get(source)
        if manifest:
            return source, manifest
    return None


def classify(
    model: str, device: DeviceState, desired: Mapping[str, Mapping[str, Any]]
) -> DeviceProgress:
    """Where ``device`` stands with ``model`` against the desired manifests by source."""
    status = device.status or {}
    raw_models = status.get("models")
    models: Mapping[str, Any] = raw_models if isinstance(raw_models, Mapping) else {}
    raw_model = models.get(model)
    m: Mapping[str, Any] = raw_model if isinstance(raw_model, Mapping) else {}
    version = _str(m.get("version"))
    base: dict[str, Any] = {
        "device": device.device, "model": model, "version": version, "fleet": device.fleet,
    }  # fmt: skip

    picked = applicable(desired)
    if picked is None:
        return DeviceProgress(**base, state=UNKNOWN, reason="no desired state published")
    source, manifest = picked
    want = _str(manifest.get("version"))
    serial = manifest.get("serial")
    base.update(
        desired_version=want,
        desired_serial=serial if isinstance(serial, int) and not isinstance(serial, bool) else None,
        source=source,
    )
    if device.status is None:
        return DeviceProgress(**base, state=UNKNOWN, reason="no retained status from the device")

    raw_tags = status.get("tags")
    tags: Mapping[str, Any] = raw_tags if isinstance(raw_tags, Mapping) else {}
    outside = targeting(manifest, device.device, tags) if source == FLEET else None
    base["targeted"] = outside is None
    state, reason = _judge(want, base["desired_serial"], version, m)
    shadow = m.get("shadow")
    if (
        manifest.get("shadow") is True
        and isinstance(shadow, Mapping)
        and shadow.get("version") == want
    ):
        compared, agreed = shadow.get("compared"), shadow.get("agreed")
        base["shadow_compared"] = compared if isinstance(compared, int) else 0
        base["shadow_agreed"] = agreed if isinstance(agreed, int) else 0
        state, reason = (
            UPDATING,
            (
                f"{want} in shadow beside {version or 'nothing'} "
                f"({base['shadow_compared']} rows compared)"
            ),
        )
    if outside is not None and state not in (ACTIVE, PROBATION):
        # Outside the rollout it keeps what it runs: that is not a failure of this version.
        return DeviceProgress(**base, state=NOT_IN_ROLLOUT, reason=outside)
    if device.state == "offline":
        last = f"last seen {state}" + (f" on {version}" if version else "")
        gone = _str(status.get("reason")) or "offline"
        return DeviceProgress(**base, state=OFFLINE, reason=f"{gone} ({last})")
    return DeviceProgress(**base, state=state, reason=reason)


def _judge(
    want: str | None, serial: int | None, version: str | None, m: Mapping[str, Any]
) -> tuple[str, str]:
    """The state of a device against the desired version ``want`` (manifest ``serial``)."""
    said = _str(m.get("state")) or ""
    reason = _str(m.get("reason")) or ""
    raw_desired = m.get("desired")
    seen: Mapping[str, Any] = raw_desired if isinstance(raw_desired, Mapping) else {}
    decision = _str(seen.get("decision")) or ""
    # What the device decided is about the version it weighed; a decision about another
    # version (an older manifest) says nothing about this one.
    about_this = seen.get("version") == want if seen.get("version") is not None else None

    if want is not None and version == want:
        if said == PROBATION:
            return PROBATION, reason or f"{want} on probation"
        return ACTIVE, ""
    if about_this is not False:
        if decision == REJECTED or said in _REFUSED or _legacy_refusal(want, reason):
            return REJECTED, reason or f"{want} rejected"
        if said == ROLLED_BACK:
            return ROLLED_BACK, reason or f"{want} rolled back"
        # "Not in rollout" is about one manifest's percent: after a widening (a new
        # serial) the device has simply not weighed the new one yet.
        stale = serial is not None and seen.get("serial") not in (None, serial)
        if NOT_IN_ROLLOUT in (decision, said) and not stale:
            return NOT_IN_ROLLOUT, reason or "not in rollout (the device says)"
    if said in _MOVING and reason:
        return UPDATING, reason
    runs = f"on {version}" if version else "nothing installed"
    return UPDATING, f"{runs}, {want} desired"


def _legacy_refusal(want: str | None, reason: str) -> bool:
    """Agents before issue 13 report a refusal as ``active`` with this reason."""
    return want is not None and reason.startswith(f"delivery of {want} refused")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# --- summary ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Counts of ``DeviceProgress`` rows by state, with the versions they were judged on."""

    total: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    versions: tuple[str, ...] = ()  # desired versions, most common first
    shadow_compared: int = 0  # over the rows' shadow candidates (agreement conditions)
    shadow_agreed: int = 0

    def count(self, state: str) -> int:
        return int(self.counts.get(state, 0))

    @property
    def on_desired(self) -> int:
        return self.count(ACTIVE) + self.count(PROBATION)

    def share(self, state: str) -> float:
        """``state``'s share of ``total`` in percent (0 when there are no rows)."""
        return 100.0 * self.count(state) / self.total if self.total else 0.0

    def line(self) -> str:
        """``150/200 on 1.4.0, 3 rejected, 2 rolled back, 45 not in rollout``."""
        if not self.total:
            return "no devices"
        target = self.versions[0] if len(self.versions) == 1 else "their desired version"
        head = f"{self.on_desired}/{self.total} on {target}"
        if self.count(PROBATION):
            head += f" ({self.count(PROBATION)} on probation)"
        parts = [head]
        for state in (UPDATING, REJECTED, ROLLED_BACK, NOT_IN_ROLLOUT, OFFLINE, UNKNOWN):
            if n := self.count(state):
                parts.append(f"{n} {state.replace('_', ' ')}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "on_desired": self.on_desired,
            "versions": list(self.versions),
            **{s: self.count(s) for s in STATES},
            "line": self.line(),
        }


def summarize(rows: Iterable[DeviceProgress]) -> Summary:
    rows = list(rows)
    counts = Counter(r.state for r in rows)
    versions = Counter(r.desired_version for r in rows if r.desired_version is not None)
    return Summary(
        total=len(rows),
        counts=dict(counts),
        versions=tuple(v for v, _ in versions.most_common()),
        shadow_compared=sum(r.shadow_compared for r in rows),
        shadow_agreed=sum(r.shadow_agreed for r in rows),
    )
