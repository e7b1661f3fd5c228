"""The self-driving rollout's plan, retained on ``{prefix}/fleets/{F}/models/{M}/rollout``.

Written by operators only (``edge-fleet rollout`` and its followers), read by them, the
exporter and ``edge-fleet status``; devices never read it, they follow the signed
desired state alone. The plan is the truth, the desired manifest's ``rollout.percent``
follows it: a follower that finds them apart re-signs the desired state to the plan.

Beyond the fields of docs/fleet.md, ``revision`` grows with every write and ``driver``
names the writer: a follower writes, waits, reads back and acts only when its own
revision is the one retained (fleet/rollouts.py), so two followers never both act.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from agent.wire.names import is_name
from agent.wire.payloads import InvalidPayload
from agent.wire.times import parse_rfc3339, rfc3339

SCHEMA = 1
RUNNING, HALTED, DONE, ABORTED = "running", "halted", "done", "aborted"
STATES = (RUNNING, HALTED, DONE, ABORTED)
TIMES = ("started_at", "step_started_at", "updated_at")


def plan(
    *,
    fleet: str,
    model: str,
    version: str,
    sha256: str,
    steps: Sequence[float],
    every_s: float,
    halt_if: str,
    promote_if: str | None = None,
    rollback_on_halt: bool = False,
    where: Mapping[str, str] | None = None,
    previous_version: str | None = None,
    driver: str | None = None,
    t: float | None = None,
) -> dict[str, Any]:
    """A new plan at its first step, running."""
    now = rfc3339(t)
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "fleet": fleet,
        "model": model,
        "version": version,
        "sha256": sha256,
        "steps": [_plain(p) for p in steps],
        "every_s": _plain(every_s),
        "halt_if": halt_if,
        "promote_if": promote_if,
        "rollback_on_halt": rollback_on_halt,
        "where": dict(where or {}),
        "step": 0,
        "percent": _plain(steps[0]) if steps else None,
        "state": RUNNING,
        "reason": f"step 1/{len(steps)} ({_plain(steps[0]):g}%)" if steps else None,
        "started_at": now,
        "step_started_at": now,
        "updated_at": now,
        "previous_version": previous_version,
        "revision": 1,
        "driver": driver,
    }
    return check_plan(payload, "rollout plan")


def _plain(n: float) -> float | int:
    """1.0 -> 1: steps read back as the operator wrote them."""
    return int(n) if float(n).is_integer() else float(n)


def check_plan(payload: Any, where: str) -> dict[str, Any]:
    """A plan as documented, or ``InvalidPayload`` naming ``where`` and the field."""
    if not isinstance(payload, dict):
        raise InvalidPayload(f"{where}: expected a JSON object, got {type(payload).__name__}")
    obj = payload
    if obj.get("schema") != SCHEMA:
        raise InvalidPayload(f"{where}: schema: expected {SCHEMA}, got {obj.get('schema')!r:.60}")
    for key in ("fleet", "model"):
        if not is_name(obj.get(key)):
            raise InvalidPayload(f"{where}: {key}: expected a name, got {obj.get(key)!r:.60}")
    for key in ("version", "sha256", "halt_if"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise InvalidPayload(f"{where}: {key}: expected a string, got {obj.get(key)!r:.60}")
    for key in ("promote_if", "reason", "previous_version", "driver"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise InvalidPayload(f"{where}: {key}: expected a string, got {obj[key]!r:.60}")
    steps = obj.get("steps")
    if (
        not isinstance(steps, list) or not steps
        or not all(_number(p) and 0 < p <= 100 for p in steps)
        or any(a >= b for a, b in itertools.pairwise(steps))
    ):  # fmt: skip
        raise InvalidPayload(
            f"{where}: steps: expected increasing percents in 0 < p <= 100, got {steps!r:.60}"
        )
    if not _number(obj.get("every_s")) or obj["every_s"] < 0:
        raise InvalidPayload(f"{where}: every_s: expected seconds >= 0, got {obj.get('every_s')!r}")
    if not isinstance(obj.get("rollback_on_halt"), bool):
        raise InvalidPayload(f"{where}: rollback_on_halt: expected true or false")
    tags = obj.get("where")
    if not isinstance(tags, dict) or not all(
        is_name(k) and is_name(v) for k, v in tags.items()
    ):  # fmt: skip
        raise InvalidPayload(f"{where}: where: expected an object of tag names, got {tags!r:.60}")
    step = obj.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < len(steps):
        raise InvalidPayload(f"{where}: step: expected an index into steps, got {step!r}")
    if obj.get("percent") != steps[step]:
        raise InvalidPayload(
            f"{where}: percent: {obj.get('percent')!r} is not steps[{step}] = {steps[step]:g}"
        )
    if obj.get("state") not in STATES:
        raise InvalidPayload(
            f"{where}: state: expected one of {', '.join(STATES)}, got {obj.get('state')!r:.60}"
        )
    for key in TIMES:
        try:
            parse_rfc3339(obj.get(key))  # type: ignore[arg-type]
        except ValueError:
            raise InvalidPayload(
                f"{where}: {key}: {obj.get(key)!r:.60} is not an RFC 3339 time"
            ) from None
    if not isinstance(obj.get("rollback_pending", False), bool):
        raise InvalidPayload(f"{where}: rollback_pending: expected true or false")
    revision = obj.get("revision", 1)
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise InvalidPayload(f"{where}: revision: expected an integer >= 1, got {revision!r}")
    return obj


def seconds(payload: Mapping[str, Any], key: str) -> float:
    """A checked plan's time field as seconds since the epoch."""
    return parse_rfc3339(payload[key]).timestamp()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
