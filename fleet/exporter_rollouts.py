"""The exporter's rollout figures: the retained plans of self-driving rollouts.

``edge-fleet rollout --steps ... --follow`` keeps each rollout's plan and progress
retained on ``{prefix}/fleets/{F}/models/{M}/rollout`` (payload in docs/fleet.md,
built and checked by ``agent.wire.rollouts``). The exporter subscribes to every such
topic and serves, per rollout, its state, percent and how long its current step and
its last update are ago, so Prometheus can alert when a rollout halts or stops moving.

The plan is read leniently, field by field: an exporter must keep serving when a newer
rollout driver adds fields or a plan is half-written by hand, so a field that is missing
or of the wrong type only leaves its own series out. Fleet and model come from the topic
(the broker's ACL guards it), not from the payload. An empty retained message (what
``unpublish`` writes) removes the rollout and its series.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.wire.times import parse_rfc3339
from agent.wire.topics import Topics
from prometheus_client.core import GaugeMetricFamily, Metric

ROLLOUT = ["fleet", "model", "version"]
# The states a plan can be in (docs/fleet.md). Each is exported with 0 or 1 so that an
# alert can say `edge_fleet_rollout_state{state="halted"} == 1` and a graph of a state
# shows 0 rather than a gap while the rollout is in another one.
STATES = ("running", "halted", "done", "aborted")
MAX_REASON = 200  # a label, not a document: a longer reason is cut


@dataclass(frozen=True)
class Rollout:
    """What the exporter keeps of one plan: only the fields it serves."""

    fleet: str
    model: str
    version: str
    state: str
    reason: str
    halt_if: str
    percent: float | None
    step: float | None
    every_s: float | None
    step_started_at: float | None
    updated_at: float | None


def _text(plan: dict[str, Any], key: str) -> str:
    value = plan.get(key)
    return value if isinstance(value, str) else ""


def _number(plan: dict[str, Any], key: str) -> float | None:
    value = plan.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _epoch(plan: dict[str, Any], key: str) -> float | None:
    try:
        return parse_rfc3339(plan[key]).timestamp()
    except (KeyError, ValueError, TypeError):
        return None


def read_plan(fleet: str, model: str, payload: bytes | bytearray) -> Rollout | None:
    """The exported fields of a plan, or None when the payload is no JSON object."""
    try:
        plan = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(plan, dict):
        return None
    reason = _text(plan, "reason")
    return Rollout(
        fleet=fleet,
        model=model,
        version=_text(plan, "version"),
        state=_text(plan, "state") or "unknown",
        reason=reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…",
        halt_if=_text(plan, "halt_if"),
        percent=_number(plan, "percent"),
        step=_number(plan, "step"),
        every_s=_number(plan, "every_s"),
        step_started_at=_epoch(plan, "step_started_at"),
        updated_at=_epoch(plan, "updated_at"),
    )


class RolloutPlans:
    """Thread-safe map (fleet, model) -> Rollout, fed by the retained rollout topics."""

    def __init__(self, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self._lock = threading.Lock()
        self._plans: dict[tuple[str, str], Rollout] = {}
        self.invalid_messages = 0

    def key_of(self, topic: str) -> tuple[str, str] | None:
        """(fleet, model) of ``{prefix}/fleets/{F}/models/{M}/rollout``, else None."""
        head = f"{self.topics.prefix}/fleets/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 4 or parts[1] != "models" or parts[3] != "rollout":
            return None
        return parts[0], parts[2]

    def receive(self, topic: str, payload: bytes | bytearray) -> bool:
        """Take one message; True when it was a rollout topic."""
        key = self.key_of(topic)
        if key is None:
            return False
        plan = read_plan(*key, payload) if payload else None
        with self._lock:
            if not payload:
                self._plans.pop(key, None)  # unpublished: the rollout is gone
            elif plan is None:
                self.invalid_messages += 1  # keep the previous plan rather than guess
            else:
                self._plans[key] = plan
        return True

    def snapshot(self) -> list[Rollout]:
        with self._lock:
            return sorted(self._plans.values(), key=lambda r: (r.fleet, r.model))

    def collect(self, now: float) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "edge_fleet_rollout_state",
            "1 for the state a self-driving rollout is in (running, halted, done, aborted), 0 for the others.",
            labels=[*ROLLOUT, "state"],
        )
        info = GaugeMetricFamily(
            "edge_fleet_rollout_info",
            "Always 1; a rollout's state, the reason of its last change and its halt condition.",
            labels=[*ROLLOUT, "state", "reason", "halt_if"],
        )
        percent = GaugeMetricFamily(
            "edge_fleet_rollout_percent",
            "Share of the fleet the rollout's current step targets, in percent.",
            labels=ROLLOUT,
        )
        step = GaugeMetricFamily(
            "edge_fleet_rollout_step",
            "Index of the rollout's current step in its list of steps (0 is the first).",
            labels=ROLLOUT,
        )
        every = GaugeMetricFamily(
            "edge_fleet_rollout_step_interval_seconds",
            "How long the rollout holds each step before it may advance (--every).",
            labels=ROLLOUT,
        )
        step_age = GaugeMetricFamily(
            "edge_fleet_rollout_step_age_seconds",
            "Seconds since the rollout's current step began.",
            labels=ROLLOUT,
        )
        updated_age = GaugeMetricFamily(
            "edge_fleet_rollout_updated_age_seconds",
            "Seconds since the rollout driver last wrote the plan.",
            labels=ROLLOUT,
        )
        rollouts = self.snapshot()
        for r in rollouts:
            labels = [r.fleet, r.model, r.version]
            for name in (*STATES, *(() if r.state in STATES else (r.state,))):
                state.add_metric([*labels, name], 1.0 if name == r.state else 0.0)
            info.add_metric([*labels, r.state, r.reason, r.halt_if], 1.0)
            for family, number in ((percent, r.percent), (step, r.step), (every, r.every_s)):
                if number is not None:
                    family.add_metric(labels, number)
            for family, at in ((step_age, r.step_started_at), (updated_age, r.updated_at)):
                if at is not None:
                    family.add_metric(labels, max(0.0, now - at))
        # Every state always has a series (0 too), so "rollouts halted" reads 0, not "no data".
        tally = GaugeMetricFamily(
            "edge_fleet_rollouts",
            "Rollout plans retained on the broker, by state.",
            labels=["state"],
        )
        counts: dict[str, int] = {}
        for r in rollouts:
            counts[r.state] = counts.get(r.state, 0) + 1
        for name in sorted(set(STATES) | set(counts)):
            tally.add_metric([name], float(counts.get(name, 0)))
        yield from (state, info, percent, step, every, step_age, updated_age, tally)
