"""One turn of a self-driving rollout: read the broker, decide, write the plan, act.

The plan (``agent/wire/rollouts.py``) is retained on the broker and is the truth;
every turn starts from a fresh read of it, of the devices' retained status and of the
desired manifests, so a follower keeps no state of its own: it can be killed at any
moment, restarted, or run twice.

A turn of a running plan, in order:

1. superseded: the fleet's desired manifest is no longer the plan's artifact (someone
   published another version): the plan is aborted, saying so;
2. reconcile: the desired ``rollout.percent`` is not the plan's for more than
   ``RECONCILE_AFTER_S`` (a follower died between writing the plan and re-signing):
   re-sign to the plan's percent;
3. ``decide`` on the devices the current step targets: halt as soon as the halt
   condition holds; advance when ``every_s`` has passed since the step began, the
   promote condition (if any) holds and the halt condition does not; done when the
   last step has held that long.

Two followers at once: every write is a claim. The writer publishes the plan with
``revision + 1`` and its own ``driver`` id, waits ``SETTLE_S``, reads the retained plan
back, and acts (re-signs, rolls back) only when the retained one is still its own.
Of two claims on the same revision the broker keeps one, and both writers read back
the same one, so exactly one acts. This holds as long as no writer takes longer than
``SETTLE_S`` between reading the plan and publishing its claim (Fischer's timed
mutual exclusion); a turn does that in milliseconds. The acts themselves are
idempotent (set percent P; roll back to version V), so even a late duplicate costs
one extra serial, never a skipped step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.wire import rollouts
from agent.wire.errors import EdgeError, UsageError
from agent.wire.payloads import InvalidPayload
from agent.wire.times import rfc3339

from fleet import progress
from fleet.expr import parse
from fleet.progress import DeviceProgress, Summary
from fleet.publish import rollback, rollout
from fleet.report import Report
from fleet.retained import Session
from fleet.state import FleetState

log = logging.getLogger(__name__)

SETTLE_S = 1.5
# A plan whose percent the desired state has not caught up with for this long lost its
# writer between the claim and the re-sign.
RECONCILE_AFTER_S = 15.0


class RolloutError(EdgeError):
    """A rollout plan cannot be created, resumed or driven as asked."""


# --- deciding (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    kind: str  # "wait" | "advance" | "halt" | "done"
    reason: str
    # A wait because --promote-if does not hold (not merely the step's time): the
    # follower says why, so a refused promotion is visible where the plan is driven.
    held_back: bool = False


def step_label(plan: Mapping[str, Any]) -> str:
    return f"step {plan['step'] + 1}/{len(plan['steps'])} ({plan['percent']:g}%)"


def decide(plan: Mapping[str, Any], targeted: Summary, now: float) -> Decision:
    """What a running plan does now, given the counts over the devices its step targets.

    With no device targeted yet (1% of three devices is nobody) there is nothing to
    halt on and nothing to wait for: the step only waits out ``every_s``.
    """
    at = step_label(plan)
    halt_if = parse(plan["halt_if"], "halt_if")
    promote_if = parse(plan["promote_if"], "promote_if") if plan.get("promote_if") else None
    if targeted.total:
        halt = halt_if.evaluate(targeted)
        if halt.holds:
            return Decision("halt", f"halted at {at}: {halt.why}")
    elapsed = now - rollouts.seconds(plan, "step_started_at")
    if elapsed < plan["every_s"]:
        left = plan["every_s"] - elapsed
        return Decision("wait", f"{at}: next in {left:.0f} s; {targeted.line()}")
    if promote_if is not None and targeted.total:
        promote = promote_if.evaluate(targeted)
        if not promote.holds:
            return Decision(
                "wait", f"{at}: waiting for {plan['promote_if']}: {promote.why}", held_back=True
            )
    if plan["step"] + 1 >= len(plan["steps"]):
        return Decision("done", f"done at {at}: {targeted.line()}")
    nxt = plan["steps"][plan["step"] + 1]
    held = targeted.line() if targeted.total else "no device in it yet"
    return Decision("advance", f"{at} held ({held}); widening to {nxt:g}%")


def moved(plan: Mapping[str, Any], decision: Decision, now: float) -> dict[str, Any]:
    """The plan after ``decision`` (not yet written)."""
    new = dict(plan)
    stamp = rfc3339(now)
    if decision.kind == "advance":
        new["step"] = plan["step"] + 1
        new["percent"] = plan["steps"][new["step"]]
        new["step_started_at"] = stamp
        new["reason"] = f"{step_label(new)} since {stamp}"
    elif decision.kind == "halt":
        new["state"] = rollouts.HALTED
        new["reason"] = decision.reason
        if plan["rollback_on_halt"]:
            new["rollback_pending"] = True
    elif decision.kind == "done":
        new["state"] = rollouts.DONE
        new["reason"] = decision.reason
    return new


# --- what the broker holds --------------------------------------------------------------


@dataclass
class View:
    """One fresh read of plans, desired manifests and device status."""

    plans: dict[str, dict[str, Any]] = field(default_factory=dict)  # topic -> checked plan
    desired: dict[str, dict[str, Any]] = field(default_factory=dict)  # topic -> manifest
    fleet: FleetState = field(default_factory=FleetState)

    def fleet_desired(self, session: Session, plan: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.desired.get(session.topics.fleet_desired(plan["fleet"], plan["model"]))

    def rows(self, session: Session, plan: Mapping[str, Any]) -> list[DeviceProgress]:
        t, model = session.topics, plan["model"]
        fleet_manifest = self.fleet_desired(session, plan)
        out = []
        for device in self.fleet.snapshot(plan["fleet"]):
            desired: dict[str, Mapping[str, Any]] = {}
            if fleet_manifest is not None:
                desired[progress.FLEET] = fleet_manifest
            own = self.desired.get(t.device_desired(device.device, model))
            if own is not None:
                desired[progress.DEVICE] = own
            out.append(progress.classify(model, device, desired))
        return out

    def targeted(self, session: Session, plan: Mapping[str, Any]) -> Summary:
        """Counts over the devices the fleet's rollout step targets (not those pinned by
        a desired state of their own: the plan does not move them)."""
        rows = self.rows(session, plan)
        return progress.summarize(r for r in rows if r.targeted and r.source == progress.FLEET)


def read_plans(session: Session) -> dict[str, dict[str, Any]]:
    plans = {}
    for topic, payload in session.read_retained([session.topics.all_rollouts()]).items():
        try:
            plans[topic] = rollouts.check_plan(json.loads(payload), topic)
        except (ValueError, InvalidPayload) as e:
            log.warning("ignoring %s: %s", topic, e)
    return plans


def read_view(session: Session, *, always: bool = False) -> View:
    """Plans, and when one needs driving (or ``always``) the fleet's status and desired state."""
    t = session.topics
    view = View(plans=read_plans(session), fleet=FleetState(t))
    if not always and not any(p["state"] == rollouts.RUNNING or p.get("rollback_pending")
               for p in view.plans.values()):  # fmt: skip
        return view  # nothing to drive: spare the broker the fleet's status
    filters = [t.all_status(), t.fleet_desired("+", "+"), t.device_desired("+", "+")]
    for topic, payload in session.read_retained(filters).items():
        if topic.endswith("/status"):
            view.fleet.receive(topic, payload, retained=True)
            continue
        with contextlib.suppress(ValueError):
            manifest = json.loads(payload)
            if isinstance(manifest, dict):
                view.desired[topic] = manifest
    return view


# --- writing: claim, then act -------------------------------------------------------------


def claim(
    session: Session, topic: str, new: dict[str, Any], *, driver: str, settle: float = SETTLE_S,
    now: float | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Write ``new`` as the next revision of the plan on ``topic``; the written plan when
    it is still the retained one after ``settle`` seconds, else None (another writer won)."""
    plan = dict(new)
    plan["revision"] = int(new.get("revision", 0)) + 1
    plan["driver"] = driver
    plan["updated_at"] = rfc3339(now)
    rollouts.check_plan(plan, topic)
    session.wait([session.publish(topic, json.dumps(plan).encode())], f"rollout plan {topic}")
    time.sleep(settle)
    back = session.read_retained([topic]).get(topic)
    try:
        got = json.loads(back) if back else None
    except ValueError:
        got = None
    if not isinstance(got, dict) or got.get("revision") != plan["revision"]:
        return None
    return plan if got.get("driver") == driver else None


@dataclass(frozen=True)
class Acts:
    """How a turn changes the desired state (fleet/publish.py; its lines go to stderr)."""

    options: Any
    key: Path
    strict: bool = False

    def percent(
        self, plan: Mapping[str, Any], *, where: Mapping[str, str] | None = None,
        promote: bool = False,
    ) -> None:  # fmt: skip
        """Re-sign the fleet's desired state at the plan's percent; ``where`` None keeps
        the manifest's tag selection; ``promote`` drops ``shadow``: the candidate serves."""
        rollout(self.options, plan["model"], fleet=plan["fleet"], percent=plan["percent"],
                key=self.key, where=where, strict=self.strict, promote=promote,
                report=Report(json=True))  # fmt: skip

    def rollback(self, plan: Mapping[str, Any]) -> None:
        rollback(self.options, plan["model"], fleet=plan["fleet"], key=self.key,
                 to=plan.get("previous_version"), report=Report(json=True))  # fmt: skip


Say = Callable[[str], None]


def turn(
    session: Session, topic: str, plan: dict[str, Any], view: View, acts: Acts, *,
    driver: str, say: Say, now: float | None = None, settle: float = SETTLE_S,
) -> tuple[dict[str, Any], Decision | None]:  # fmt: skip
    """Drive one plan one turn; returns the plan as it now stands and what was decided."""
    now = time.time() if now is None else now
    label = f"{plan['model']} {plan['version']} on fleet {plan['fleet']}"
    desired = view.fleet_desired(session, plan)

    if plan.get("rollback_pending"):
        if desired is not None and desired.get("version") == plan["version"]:
            won = claim(session, topic, plan, driver=driver, settle=settle, now=now)
            if won is None:
                return plan, None
            plan = won
            return _roll_back(session, topic, plan, acts, driver=driver, say=say, now=now), None
        done = {**plan, "rollback_pending": False}
        return claim(session, topic, done, driver=driver, settle=0, now=now) or plan, None
    if plan["state"] != rollouts.RUNNING:
        return plan, None

    sha = ((desired or {}).get("artifact") or {}).get("sha256")
    if desired is None or sha != plan["sha256"]:
        now_desired = f"{desired.get('version')}" if desired else "nothing"
        why = f"superseded: fleet {plan['fleet']} now desires {now_desired}, not this artifact"
        new = {**plan, "state": rollouts.ABORTED, "reason": why}
        say(f"{label}: {why}")
        return claim(session, topic, new, driver=driver, settle=0, now=now) or plan, None

    percent = (desired.get("rollout") or {}).get("percent", 100)
    if percent != plan["percent"]:
        # The writer of the plan re-signs right after its claim; only when that has not
        # happened for a while did it die in between, and someone else steps in.
        if now - rollouts.seconds(plan, "updated_at") < RECONCILE_AFTER_S:
            return plan, None
        won = claim(session, topic, plan, driver=driver, settle=settle, now=now)
        if won is not None:
            say(
                f"{label}: desired is at {percent:g}%, the plan at {plan['percent']:g}%: re-signing"
            )
            acts.percent(won)
        return won or plan, None

    try:
        decision = decide(plan, view.targeted(session, plan), now)
    except UsageError as e:
        # A plan written by hand with a condition edge-fleet would have refused: stop
        # it, saying why, rather than fail the same way every turn.
        decision = Decision("halt", f"halted at {step_label(plan)}: cannot judge the step: {e}")
    if decision.kind == "wait":
        return plan, decision
    won = claim(session, topic, moved(plan, decision, now), driver=driver, settle=settle, now=now)
    if won is None:
        return plan, None
    say(f"{label}: {decision.reason}")
    # A --shadow desired state is the step that compares: the step it moves to (or the
    # end of the plan) promotes the candidate, which then serves and goes on probation.
    shadow = desired.get("shadow") is True
    if shadow and decision.kind in ("advance", "done"):
        say(f"{label}: promoting {plan['version']} from shadow")
        acts.percent(won, promote=True)
    elif decision.kind == "advance":
        acts.percent(won)
    elif decision.kind == "halt" and won.get("rollback_pending"):
        won = _roll_back(session, topic, won, acts, driver=driver, say=say, now=now)
    return won, decision


def _roll_back(
    session: Session, topic: str, plan: dict[str, Any], acts: Acts, *,
    driver: str, say: Say, now: float,
) -> dict[str, Any]:  # fmt: skip
    """Roll the fleet back (the claim on ``plan`` is won) and say so in the plan."""
    to = plan.get("previous_version") or "the version published before"
    say(f"{plan['model']} on fleet {plan['fleet']}: rolling back to {to}")
    try:
        acts.rollback(plan)
        outcome = f"rolled back to {to}"
    except EdgeError as e:
        # Not retried every turn: the operator reads why and rolls back by hand.
        outcome = f"rollback to {to} failed: {e}"
        log.error("%s", outcome)
    after = {**plan, "rollback_pending": False, "reason": f"{plan['reason']}; {outcome}"}
    return claim(session, topic, after, driver=driver, settle=0, now=now) or plan
