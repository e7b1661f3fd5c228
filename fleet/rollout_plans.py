"""What an operator does to a rollout plan: create, resume, abort, set by hand, follow, show.

``fleet/rollouts.py`` is the command line over these; ``fleet/rollout_driver.py`` is one
turn of a follower. Every write of a plan is a claim (``rollout_driver.claim``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.wire import rollouts
from agent.wire.errors import EdgeError
from agent.wire.times import rfc3339

from fleet import rollout_driver as driver
from fleet.connection import BrokerOptions
from fleet.expr import parse
from fleet.publish import rollout as set_percent
from fleet.report import Report
from fleet.retained import Session, history_key, read_model_state
from fleet.rollout_driver import Acts, RolloutError, claim, read_plans, read_view, step_label
from fleet.term import Progress

POLL_S = 5.0


def _plan_of(session: Session, fleet: str, model: str) -> tuple[str, dict[str, Any] | None]:
    topic = session.topics.fleet_rollout(fleet, model)
    return topic, read_plans(session).get(topic)


def _write(
    session: Session, topic: str, make: Callable[[dict[str, Any] | None], dict[str, Any]],
    who: str,
) -> dict[str, Any]:  # fmt: skip
    """An operator's write: ``make(current plan)``, claimed like a follower's and made
    again on the fresh plan when a follower wrote in between (the operator's word stands)."""
    current = read_plans(session).get(topic)
    for _attempt in range(5):
        new = make(current)
        new["revision"] = current.get("revision", 1) if current else 0
        won = claim(session, topic, new, driver=who)
        if won is not None:
            return won
        current = read_plans(session).get(topic)
    raise RolloutError(f"{topic}: other writers kept changing the plan; try again")


def create(
    options: BrokerOptions, model: str, *, fleet: str, steps: Sequence[float], every_s: float,
    halt_if: str, promote_if: str | None, rollback_on_halt: bool,
    where: Mapping[str, str] | None, key: Path, who: str, strict: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Re-sign the desired state at the first step, then write the plan that drives it.

    In that order, so what the publisher refuses (``--strict``, a fleet nobody is in)
    leaves no plan behind; a plan never names a percent the desired state cannot take.
    ``where`` None keeps the published tag selection, ``{}`` drops it."""
    halt_text = str(parse(halt_if, "--halt-if"))
    promote_text = str(parse(promote_if, "--promote-if")) if promote_if else None
    session = Session(options, "rollout")
    try:
        topic, old = _plan_of(session, fleet, model)
        if old is not None and old["state"] == rollouts.RUNNING:
            raise RolloutError(
                f"{model}: a rollout of {old['version']} is running on fleet {fleet} "
                f"({step_label(old)}); --abort it first, or leave it to its followers"
            )
        state = read_model_state(session, model)
        desired = state.desired.get(session.topics.fleet_desired(fleet, model))
        if desired is None:
            raise RolloutError(
                f"{model}: nothing is published for fleet {fleet}; publish the new version "
                f"first (edge-fleet publish PACKAGE --fleet {fleet} --rollout 0)"
            )
        sha = desired["artifact"]["sha256"]
        history = state.history.get(session.topics.fleet_history(fleet, model), [])
        older = [e for e in history if history_key(e) != history_key(desired)]
        rollout_block = desired.get("rollout") or {}
        plan = rollouts.plan(
            fleet=fleet, model=model, version=desired["version"], sha256=sha, steps=steps,
            every_s=every_s, halt_if=halt_text, promote_if=promote_text,
            rollback_on_halt=rollback_on_halt,
            where=rollout_block.get("where") or {} if where is None else where,
            previous_version=older[-1].get("version") if older else None, driver=who,
        )  # fmt: skip
        Acts(options, key, strict=strict).percent(plan, where=where)
        written = _write(session, topic, lambda _current: dict(plan), who)
    finally:
        session.close()
    print(f"{model} {written['version']}: rollout on fleet {fleet} started at {step_label(written)}"
          f"; steps {', '.join(f'{p:g}%' for p in steps)} every {every_s:g} s",
          file=sys.stderr)  # fmt: skip
    return written


def change(
    options: BrokerOptions, model: str, *, fleet: str, action: str, who: str,
    key: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``resume`` a halted (or aborted) plan at its step, or ``abort`` a running one."""
    session = Session(options, "rollout")
    try:
        topic, plan = _plan_of(session, fleet, model)
        if action == "resume":
            plan = _resume(session, topic, plan, model=model, fleet=fleet, who=who)
        else:
            plan = _abort(session, topic, plan, model=model, fleet=fleet, who=who, by="--abort")
            if plan is None:
                raise RolloutError(f"{model}: no running rollout on fleet {fleet}")
    finally:
        session.close()
    if action == "resume":
        assert key is not None
        Acts(options, key).percent(plan)
    return plan


def by_hand(
    options: BrokerOptions, model: str, *, fleet: str, percent: float, key: Path, who: str,
    where: Mapping[str, str] | None, strict: bool, report: Report,
) -> dict[str, Any] | None:  # fmt: skip
    """``--percent``: abort a running (or halted) plan, saying so, then set the percent.

    The abort comes first: a follower finding the plan running and the percent changed
    under it would otherwise re-sign the plan's percent."""
    session = Session(options, "rollout")
    try:
        topic, plan = _plan_of(session, fleet, model)
        aborted = _abort(session, topic, plan, model=model, fleet=fleet, who=who,
                         by=f"--percent {percent:g} set by hand")  # fmt: skip
    finally:
        session.close()
    set_percent(options, model, fleet=fleet, percent=percent, key=key, where=where,
                strict=strict, report=report)  # fmt: skip
    return aborted


def _abort(
    session: Session, topic: str, plan: dict[str, Any] | None, *, model: str, fleet: str,
    who: str, by: str,
) -> dict[str, Any] | None:  # fmt: skip
    """The plan aborted (None when none is running or halted)."""
    if plan is None or plan["state"] not in (rollouts.RUNNING, rollouts.HALTED):
        if plan is not None and by == "--abort":
            raise RolloutError(f"{model}: no running rollout on fleet {fleet} "
                               f"(plan: {plan['state']})")  # fmt: skip
        return None
    found, was = plan, plan["state"]

    def aborted(current: dict[str, Any] | None) -> dict[str, Any]:
        base = current or found
        return {**base, "state": rollouts.ABORTED, "rollback_pending": False,
                "reason": f"aborted ({by}) at {step_label(base)}"}  # fmt: skip

    done = _write(session, topic, aborted, who)
    print(f"{model}: aborted the {was} rollout of {done['version']} on fleet {fleet} "
          f"(it was at {step_label(done)})", file=sys.stderr)  # fmt: skip
    return done


def _resume(
    session: Session, topic: str, plan: dict[str, Any] | None, *, model: str, fleet: str,
    who: str,
) -> dict[str, Any]:  # fmt: skip
    if plan is None or plan["state"] not in (rollouts.HALTED, rollouts.ABORTED):
        state = plan["state"] if plan else "none"
        raise RolloutError(f"{model}: nothing to resume on fleet {fleet} (plan: {state})")
    desired = read_model_state(session, model).desired.get(
        session.topics.fleet_desired(fleet, model)
    )
    if desired is None or desired["artifact"]["sha256"] != plan["sha256"]:
        now = desired["version"] if desired else "nothing"
        raise RolloutError(
            f"{model}: fleet {fleet} now desires {now}, not {plan['version']} (rolled back?); "
            f"publish {plan['version']} again with --rollout 0, then --resume"
        )
    stamp = rfc3339()

    def resumed(current: dict[str, Any] | None) -> dict[str, Any]:
        base = current or plan
        return {**base, "state": rollouts.RUNNING, "step_started_at": stamp,
                "rollback_pending": False,
                "reason": f"resumed at {step_label(base)} at {stamp}"}  # fmt: skip

    return _write(session, topic, resumed, who)


def follow(
    options: BrokerOptions, key: Path, *, who: str, only: tuple[str, str] | None = None,
    fleet: str | None = None, poll: float = POLL_S, settle: float = driver.SETTLE_S,
) -> dict[str, Any] | None:  # fmt: skip
    """Drive running plans until stopped; with ``only`` = (fleet, model), that plan until
    it is no longer running, which it returns."""
    acts = Acts(options, key)
    session = Session(options, "rollout-follow")
    bar: Progress | None = None
    last = ""
    held: dict[str, str] = {}  # plan topic -> the promote condition's last verdict said
    try:
        while True:
            started = time.monotonic()
            try:
                view = read_view(session)
                for topic, seen in sorted(view.plans.items()):
                    if only and (seen["fleet"], seen["model"]) != only:
                        continue
                    if fleet and seen["fleet"] != fleet:
                        continue
                    plan, decision = driver.turn(session, topic, seen, view, acts, driver=who,
                                                 say=_say, settle=settle)  # fmt: skip
                    if (
                        decision is not None
                        and decision.held_back
                        and held.get(topic) != decision.reason
                    ):
                        held[topic] = decision.reason
                        _say(f"{plan['model']} {plan['version']} on fleet {plan['fleet']}: "
                             f"not promoted: {decision.reason}")  # fmt: skip
                    if only is None:
                        continue
                    if decision is not None and decision.reason != last and decision.kind == "wait":
                        last = decision.reason
                        bar = _show(bar, plan, view, session)
                    if plan["state"] != rollouts.RUNNING and not plan.get("rollback_pending"):
                        if bar is not None:
                            bar.done(f"({plan['state']})")
                        return plan
                if only and session.topics.fleet_rollout(*only) not in view.plans:
                    raise RolloutError(f"{only[1]}: no rollout plan on fleet {only[0]} (cleared?)")
            except RolloutError:
                raise
            except EdgeError as e:
                # The broker restarts, a publish is refused: say so, try again next turn.
                print(f"edge-fleet rollout: {e}; retrying in {poll:g} s", file=sys.stderr)
            time.sleep(max(0.0, poll - (time.monotonic() - started)))
    finally:
        session.close()


def _say(line: str) -> None:
    print(f"{rfc3339()} {line}", file=sys.stderr, flush=True)


def _show(bar: Progress | None, plan: dict[str, Any], view: driver.View, s: Session) -> Progress:
    """Devices on the version out of the fleet: a bar on a TTY, plain lines elsewhere."""
    rows = view.rows(s, plan)
    on = sum(1 for r in rows if r.on_desired)
    label = f"{plan['model']} {plan['version']} {step_label(plan)}"
    if bar is None or bar.total != len(rows):
        bar = Progress(label, max(1, len(rows)), unit=lambda n: f"{n:g} devices on it")
    bar.label = label
    bar.update(on)
    return bar


def show(options: BrokerOptions, model: str, fleet: str) -> dict[str, Any]:
    session = Session(options, "rollout")
    try:
        view = read_view(session, always=True)
        topic = session.topics.fleet_rollout(fleet, model)
        plan = view.plans.get(topic)
        if plan is None:
            raise RolloutError(f"{model}: no rollout plan on fleet {fleet}")
        summary = view.targeted(session, plan)
    finally:
        session.close()
    return {**plan, "progress": summary.as_dict()}
