"""The ``shadow`` section of a model in a health report: the candidate against the active.

``models[name].shadow`` = ``{"version", "against", "compared", "agreed", "agreement",
"confusion", "error", "latency_ms", "skipped", "failed"}``: ``version`` the candidate,
``against`` the active version it was compared with, ``compared`` rows both answered;
for labels ``agreed``/``agreement`` and ``confusion`` (``[[active, candidate, rows],
...]``, disagreements first, at most ``shadow.confusion_cells``), for numbers ``error``
(quantiles of the absolute difference); ``latency_ms`` per arm (``active_p50``,
``candidate_p99``, ...); ``skipped`` sampled batches the full queue let go, ``failed``
batches the candidate could not answer. Figures count since the candidate was installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.wire.checks import InvalidPayload, number, object_of, required_str


def shadow_summary(
    *,
    candidate: str,
    against: str,
    compared: int,
    agreement: float | None,
    confusion: list[list[Any]] | None,
    error: Mapping[str, float] | None,
    latency_ms: Mapping[str, float],
    skipped: int,
    failed: int,
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "version": candidate, "against": against, "compared": compared,
        "agreement": agreement, "skipped": skipped, "failed": failed,
        "latency_ms": dict(latency_ms),
    }  # fmt: skip
    if agreement is not None:
        section["agreed"] = round(agreement * compared)
    if confusion is not None:
        section["confusion"] = confusion
    if error is not None:
        section["error"] = dict(error)
    return check_shadow(section, "shadow")


def check_shadow(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    for key in ("version", "against"):
        required_str(obj, key, where)
    for key in ("compared", "agreed", "agreement", "skipped", "failed"):
        number(obj, key, where)
    agreement = obj.get("agreement")
    if agreement is not None and not 0 <= agreement <= 1:
        raise InvalidPayload(f"{where}: agreement: expected 0..1, got {agreement!r}")
    confusion = obj.get("confusion", [])
    if not isinstance(confusion, list) or not all(
        isinstance(c, list) and len(c) == 3 and isinstance(c[2], int) for c in confusion
    ):
        raise InvalidPayload(
            f"{where}: confusion: expected [[active, candidate, rows], ...], got {confusion!r:.60}"
        )
    for section in ("error", "latency_ms"):
        value = obj.get(section) or {}
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where}: {section}: expected an object, got {value!r:.60}")
        for key in value:
            number(value, key, f"{where}: {section}")
    return obj
