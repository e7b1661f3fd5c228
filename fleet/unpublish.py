"""``edge-fleet unpublish MODEL --fleet F [--device ID]``: stop asking devices for a model.

Clears the retained desired state (an empty retained payload; docs/protocol.md) and,
for a fleet, the self-driving rollout's plan (``Topics.fleet_rollout``), so neither a
device that connects later nor a rollout driver picks them up again. Devices keep
running what they run: an agent does not uninstall a model because nobody asks for it
any more. The history and the artifacts stay, so ``edge-fleet rollback`` (which then
goes to the version before the one unpublished, or ``--to`` any) and a new
``publish`` work as before; ``gc`` keeps the artifacts the history names.
"""

from __future__ import annotations

import argparse
from typing import Any

from agent.wire.errors import PackageError, UsageError
from agent.wire.names import check_name

from fleet.connection import BrokerOptions, add_broker_arguments
from fleet.publish import output_arguments, run_reported
from fleet.report import Report
from fleet.retained import Session, Target, read_model_state
from fleet.targets import read_known


def _name(flag: str, value: str) -> str:
    try:
        return check_name(flag, value)
    except ValueError as e:
        raise UsageError(str(e)) from None


def unpublish(
    options: BrokerOptions,
    model: str,
    *,
    fleet: str | None = None,
    device: str | None = None,
    report: Report | None = None,
) -> dict[str, Any]:
    """Clear the desired state of ``model`` for a fleet or one device; returns what it was."""
    report = report or Report()
    if not fleet and not device:
        raise UsageError("unpublish: give --fleet or --device")
    _name("MODEL", model)
    target = Target(device=_name("--device", device)) if device else Target(fleet=fleet)
    if fleet:
        _name("--fleet", fleet)
    session = Session(options, "unpublish")
    try:
        t = session.topics
        state = read_model_state(session, model)
        topic = target.desired(t, model)
        plan_topic = t.fleet_rollout(fleet, model) if fleet and not device else None
        plan = session.read_retained([plan_topic]).get(plan_topic) if plan_topic else None
        current = state.desired.get(topic)
        if current is None and plan is None:
            elsewhere = sorted(_where(t.prefix, tp) for tp in state.desired) or ["nowhere"]
            raise PackageError(
                f"{model}: nothing is published for {target}; nothing to unpublish "
                f"(published for: {', '.join(elsewhere)})"
            )
        cleared = [topic] + ([plan_topic] if plan_topic else [])
        session.wait([session.publish(tp, b"") for tp in cleared], f"clearing {model}")
        history = state.history.get(target.history(t, model), [])
        version = current.get("version") if current else None
        report.say(f"{model}: unpublished {version or '(no desired state; rollout plan)'} for "
                   f"{target}; history kept ({len(history)} versions)")  # fmt: skip
        if device:
            follows = read_known(session).devices.get(device)
            home = f"fleet {follows.fleet}" if follows and follows.fleet else "its fleet"
            report.note(
                f"device {device} keeps running what it runs; it takes {home}'s desired state "
                f"again once that is re-signed with a new serial (edge-fleet rollout {model} "
                f"--fleet F --percent P)"
            )
        else:
            report.note(
                f"devices of fleet {fleet} keep running what they run and take nothing new for "
                f"{model} until the next publish or rollback"
            )
        report.facts.update(
            model=model, fleet=target.fleet, device=target.device, version=version,
            serial=current.get("serial") if current else None, cleared=cleared,
            history_versions=[e.get("version") for e in history],
        )  # fmt: skip
        return report.facts
    finally:
        session.close()


def _where(prefix: str, topic: str) -> str:
    """``edge/fleets/f1/models/iris/desired`` -> ``fleet f1``."""
    kind, name = topic[len(prefix) + 1 :].split("/")[:2]
    return f"{kind.rstrip('s')} {name}"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    u: argparse.ArgumentParser = sub.add_parser(
        "unpublish", help="clear a model's desired state (devices keep what they run)"
    )
    u.add_argument("model")
    u.add_argument("--fleet", help="the fleet whose desired state (and rollout plan) to clear")
    u.add_argument("--device", metavar="ID", help="clear this device's own desired state instead")
    output_arguments(u)
    add_broker_arguments(u)
    u.set_defaults(func=lambda a: run_reported(a, lambda o, r: unpublish(
        o, a.model, fleet=a.fleet, device=a.device, report=r)))  # fmt: skip
    return u
