"""The ``canary`` section of a model in health and status: the two arms of a traffic split.

``models[name].canary`` = ``{"version", "against", "traffic", "arms"}``: ``version`` the
canary (published with ``--canary-traffic``), ``against`` the active version, ``traffic``
the percent of requests the canary serves, ``arms`` = ``{"active": ARM, "canary": ARM}``
with ARM = ``{"version", "requests", "errors", "error_rate", "p99_ms"}`` counted since the
split began on the same traffic (the model's own failures; refused requests are not
counted). Two arms whatever the traffic: the section is bounded.
"""

from __future__ import annotations

import hashlib
from typing import Any

from agent.wire.checks import InvalidPayload, number, object_of, required_str

ARMS = ("active", "canary")
KEY_HEADER = "X-Edge-Key"  # the caller's key: the same key always lands in the same arm
BUCKETS = 10_000  # so a percent with two decimals (0.25%) is a whole number of buckets


def traffic_bucket(model: str, key: str) -> int:
    """The key's bucket 0..9999 for ``model``: ``int(sha256(model + "/" + key)) mod 10000``,
    in the style of ``agent.wire.topics.rollout_bucket``. The canary serves the key when
    its bucket is below ``percent * 100``: sticky for a key while the percent stays, and
    widening the percent keeps every key that was in the canary there."""
    digest = hashlib.sha256(f"{model}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def canary_arm(version: str, requests: int, errors: int, p99_ms: float | None) -> dict[str, Any]:
    return {
        "version": version, "requests": requests, "errors": errors,
        "error_rate": round(errors / requests, 6) if requests else 0.0,
        "p99_ms": None if p99_ms is None else round(p99_ms, 3),
    }  # fmt: skip


def canary_summary(
    *, version: str, against: str, traffic: float, active: dict[str, Any], canary: dict[str, Any]
) -> dict[str, Any]:
    section = {"version": version, "against": against, "traffic": traffic,
               "arms": {"active": active, "canary": canary}}  # fmt: skip
    return check_canary(section, "canary")


def check_canary(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    for key in ("version", "against"):
        required_str(obj, key, where)
    traffic = obj.get("traffic")
    if isinstance(traffic, bool) or not isinstance(traffic, (int, float)) or not 0 < traffic < 100:
        raise InvalidPayload(
            f"{where}: traffic: expected a percent 0 < p < 100, got {traffic!r:.60}"
        )
    arms = obj.get("arms")
    if not isinstance(arms, dict) or set(arms) != set(ARMS):
        raise InvalidPayload(f"{where}: arms: expected {{active, canary}}, got {arms!r:.60}")
    for arm in ARMS:
        a = object_of(arms[arm], f"{where}: arms.{arm}")
        if not isinstance(a.get("version"), str):
            raise InvalidPayload(f"{where}: arms.{arm}.version: expected a string")
        for key in ("requests", "errors", "error_rate", "p99_ms"):
            number(a, key, f"{where}: arms.{arm}")
    return obj
