"""The ``drift`` section of a model in a health report: built within a byte budget, checked.

``models[name].drift`` = ``{"version", "rows", "score", "output_psi", "top", "rest"}``:
``score`` is the largest feature PSI (null until ``drift.min_rows`` live rows), ``top``
the most drifted features in full (``{"feature", "psi", "live"}``, ``live`` the live
share per bin of the manifest's profile), ``rest`` the others as one aggregate
(``{"features", "max_psi", "mean_psi"}``). However many features a model has, the
section fits ``budget`` bytes of JSON: fewer features go in full, then none keep their
bins, until it fits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from agent.wire.checks import InvalidPayload, number, object_of, required_str

# name, psi, live shares per bin; the most drifted first.
Score = tuple[str, float, list[float]]


def _size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def _rest(scores: Sequence[Score]) -> dict[str, Any]:
    if not scores:
        return {"features": 0, "max_psi": None, "mean_psi": None}
    values = [s[1] for s in scores]
    return {"features": len(values), "max_psi": round(max(values), 4),
            "mean_psi": round(sum(values) / len(values), 4)}  # fmt: skip


def drift_summary(
    version: str,
    rows: int,
    scores: Sequence[Score],
    output_psi: float | None,
    *,
    top_k: int,
    budget: int,
) -> dict[str, Any]:
    """The section for one model version, at most ``budget`` bytes where possible (a
    section with no feature in full is the floor: its size does not grow with features)."""
    head: dict[str, Any] = {
        "version": version,
        "rows": rows,
        "score": scores[0][1] if scores else None,
        "output_psi": output_psi,
    }
    # Names are the caller's: long ones are cut so one feature cannot eat the budget.
    for k in range(min(top_k, len(scores)), -1, -1):
        for with_bins in (True, False):
            top = [
                {"feature": name[:64], "psi": value, **({"live": live} if with_bins else {})}
                for name, value, live in scores[:k]
            ]
            section = {**head, "top": top, "rest": _rest(scores[k:])}
            if _size(section) <= budget or k == 0:
                return check_drift(section, "drift")
    raise AssertionError("unreachable: k == 0 always returns")


def check_drift(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    required_str(obj, "version", where)
    for key in ("rows", "score", "output_psi"):
        number(obj, key, where)
    top = obj.get("top", [])
    if not isinstance(top, list):
        raise InvalidPayload(f"{where}: top: expected a list, got {top!r:.60}")
    for i, item in enumerate(top):
        at = f"{where}: top[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("feature"), str):
            raise InvalidPayload(f"{at}: expected an object with a feature name, got {item!r:.60}")
        number(item, "psi", at)
        live = item.get("live", [])
        if not isinstance(live, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in live
        ):
            raise InvalidPayload(f"{at}: live: expected a list of numbers, got {live!r:.60}")
    rest = obj.get("rest", {})
    if not isinstance(rest, Mapping):
        raise InvalidPayload(f"{where}: rest: expected an object, got {rest!r:.60}")
    for key in ("features", "max_psi", "mean_psi"):
        number(rest, key, f"{where}: rest")
    return obj
