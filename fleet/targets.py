"""Who a publish reaches: the typo guard, the tag selection and the signing-key check.

A fleet or device is *known* when a retained status (``{prefix}/devices/+/status``, the
device's own word) or an enrolment record (``{prefix}/devices/+/enrolment``, written by
``edge-fleet enroll``) names it. A desired state published to a name nobody knows is
accepted by the broker and reaches nobody, which is how ``--fleet warehose`` used to
succeed in silence: it is warned about now, the known names listed closest first, and
refused with ``--strict``. The same goes for a ``--where`` no known device matches and
for a signing key none of the targeted devices trusts (the status lists the ids of
``models.trusted_keys``): every one of them would reject the manifest.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.wire.errors import EdgeError

from fleet.report import Report
from fleet.retained import Session

SHOW = 10  # known names listed in a warning; a fleet of hundreds would drown it


class UnknownTarget(EdgeError):
    """``--strict``: a fleet or device nobody knows, or a key nobody trusts."""


@dataclass(frozen=True)
class KnownDevice:
    device: str
    fleet: str | None = None
    state: str | None = None  # online / offline from the status; None: enrolled only
    since: str | None = None
    tags: Mapping[str, str] | None = None  # None: not reported
    trusted_keys: tuple[str, ...] | None = None  # None: not reported (an older agent)

    def matches(self, where: Mapping[str, str]) -> bool | None:
        """Whether the device's tags select it; None when it reports no tags."""
        if self.tags is None:
            return None
        return all(self.tags.get(k) == v for k, v in where.items())

    def trusts(self, kid: str) -> bool | None:
        """None: unknown. A device with no trusted keys checks no signature at all."""
        if self.trusted_keys is None:
            return None
        return not self.trusted_keys or kid in self.trusted_keys


@dataclass
class Known:
    devices: dict[str, KnownDevice] = field(default_factory=dict)

    def fleets(self) -> set[str]:
        return {d.fleet for d in self.devices.values() if d.fleet}

    def group(
        self, fleet: str | None, devices: Sequence[str], where: Mapping[str, str] | None = None
    ) -> list[KnownDevice]:
        """The known devices a target reaches (those whose tags rule them out left out)."""
        if devices:
            return [self.devices[d] for d in devices if d in self.devices]
        group = [d for d in self.devices.values() if d.fleet == fleet]
        return [d for d in group if not where or d.matches(where) is not False]


def _strings(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _tags(value: Any) -> dict[str, str] | None:
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    return None


def read_known(session: Session) -> Known:
    """Every device a retained status or enrolment names; the status wins where both do."""
    t = session.topics
    status: dict[str, dict[str, Any]] = {}
    enrolled: dict[str, dict[str, Any]] = {}
    for topic, payload in session.read_retained([t.all_status(), t.all_enrolments()]).items():
        device = t.device_of(topic)
        try:
            data = json.loads(payload)
        except ValueError:
            continue
        if device and isinstance(data, dict):
            (status if topic.endswith("/status") else enrolled)[device] = data
    known = Known()
    for device in sorted(set(status) | set(enrolled)):
        s, e = status.get(device, {}), enrolled.get(device, {})
        fleet = s.get("fleet") if isinstance(s.get("fleet"), str) else e.get("fleet")
        known.devices[device] = KnownDevice(
            device=device,
            fleet=fleet if isinstance(fleet, str) else None,
            state=s.get("state") if isinstance(s.get("state"), str) else None,
            since=s.get("since") if isinstance(s.get("since"), str) else None,
            tags=_tags(s.get("tags")) if "tags" in s else _tags(e.get("tags")),
            trusted_keys=_strings(s.get("trusted_keys")),
        )
    return known


def closest(name: str, known: Iterable[str], limit: int = SHOW) -> str:
    """``a, b, c (and 7 more)``: the names most like ``name`` first, then the rest sorted."""
    names = sorted(set(known))
    close = difflib.get_close_matches(name, names, n=limit, cutoff=0.5)
    return listing(close + [n for n in names if n not in close], limit)


def listing(names: Sequence[str], limit: int = SHOW) -> str:
    if not names:
        return "none"
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" (and {more} more)" if more > 0 else "")


def _refuse_or_warn(problems: list[str], *, strict: bool, report: Report) -> None:
    if problems and strict:
        raise UnknownTarget("; ".join(problems) + "; nothing was published (--strict)")
    for p in problems:
        report.warn(f"{p}; publishing anyway (--strict refuses)")


def check_targets(
    known: Known,
    *,
    fleet: str,
    devices: Sequence[str] = (),
    where: Mapping[str, str] | None = None,
    strict: bool,
    report: Report,
) -> None:
    """Warn about (or, strict, refuse) a fleet, device or tag selection nobody matches."""
    problems = []
    if not devices and fleet not in known.fleets():
        problems.append(
            f"fleet {fleet} is not known: no device's retained status or enrolment names it "
            f"(known fleets: {closest(fleet, known.fleets())})"
        )
    for d in devices:
        found = known.devices.get(d)
        if found is None:
            problems.append(
                f"device {d} is not known: no retained status or enrolment names it "
                f"(known devices: {closest(d, known.devices)})"
            )
        elif found.fleet and found.fleet != fleet:
            report.warn(f"device {d} is in fleet {found.fleet}, not {fleet}")
    members = [d for d in known.devices.values() if d.fleet == fleet]
    tagged = any(d.tags is not None for d in members)
    if where and not devices and tagged and not any(d.matches(where) for d in members):
        wanted = ",".join(f"{k}={v}" for k, v in sorted(where.items()))
        problems.append(f"no known device of fleet {fleet} has the tags {wanted}")
    _refuse_or_warn(problems, strict=strict, report=report)


def check_trust(
    known: Known,
    kid: str,
    *,
    fleet: str,
    devices: Sequence[str] = (),
    where: Mapping[str, str] | None = None,
    strict: bool,
    report: Report,
) -> None:
    """Say when the devices a publish reaches do not trust its signing key.

    Only devices that report their keys count: an older agent's silence is no refusal.
    """
    reporting = [d for d in known.group(fleet, devices, where) if d.trusts(kid) is not None]
    if not reporting:
        return
    refusing = [d for d in reporting if not d.trusts(kid)]
    theirs = sorted({k for d in refusing for k in d.trusted_keys or ()})
    if len(refusing) == len(reporting):
        if devices:
            who = "device" if len(devices) == 1 else "devices"
            head = f"{who} {', '.join(devices)} {'does' if len(devices) == 1 else 'do'} not trust"
        else:
            head = f"no device of fleet {fleet} trusts"
        problem = (
            f"{head} signing key {kid} (they trust {listing(theirs)}): "
            f"all {len(reporting)} that report their keys would reject it"
        )
        _refuse_or_warn([problem], strict=strict, report=report)
    elif refusing:
        report.warn(
            f"{len(refusing)} of {len(reporting)} devices do not trust signing key {kid} "
            f"and will reject it: {listing(sorted(d.device for d in refusing))}"
        )
