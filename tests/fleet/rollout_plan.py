"""A self-driving rollout's retained plan, as docs/fleet.md gives it (what
``edge-fleet rollout --steps ... --follow`` writes), for the exporter's tests."""

from __future__ import annotations

from typing import Any

from agent.wire.times import rfc3339

T0 = 1_800_000_000.0


def plan(**over: Any) -> dict[str, Any]:
    """A plan of iris 1.4.0 to fleet north on its second step (10%); ``over`` replaces fields."""
    return {
        "schema": 1, "fleet": "north", "model": "iris", "version": "1.4.0",
        "sha256": "ab" * 32, "steps": [1, 10, 50, 100], "every_s": 600,
        "halt_if": "rejected>2% or rolled_back>1%", "promote_if": None,
        "rollback_on_halt": False, "where": {}, "step": 1, "percent": 10, "state": "running",
        "reason": "", "started_at": rfc3339(T0), "step_started_at": rfc3339(T0 + 600),
        "updated_at": rfc3339(T0 + 650), **over,
    }  # fmt: skip
