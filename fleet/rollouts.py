"""``edge-fleet rollout``: a staged rollout that drives and stops itself, or one step by hand.

    edge-fleet rollout MODEL --fleet F --steps 1,10,50,100 --every 10m \\
        --halt-if "rejected>2% or rolled_back>1%" [--promote-if "active>=95%"] \\
        [--rollback-on-halt] [--where k=v] [--follow]
    edge-fleet rollout --follow                 # the follower: drives every running plan
    edge-fleet rollout MODEL --fleet F [--follow | --resume | --abort | --percent P] [--json]

Creating a plan writes it retained (``agent/wire/rollouts.py``) and re-signs the fleet's
desired manifest at the first step (``fleet/publish.py``). Followers do the rest
(``fleet/rollout_driver.py``); the state lives on the broker, so any follower, on any
machine, after any restart, carries on where the last one stopped. The operations on a
plan are in ``fleet/rollout_plans.py``; this module is their command line.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

from agent.wire import rollouts
from agent.wire.errors import UsageError
from agent.wire.names import check_name

from fleet.connection import add_broker_arguments, broker_options
from fleet.expr import parse
from fleet.publish import key_argument
from fleet.report import Report, output_arguments
from fleet.rollout_driver import RolloutError, step_label
from fleet.rollout_plans import POLL_S, by_hand, change, create, follow, show
from fleet.targets import parse_where, where_argument
from fleet.term import print_json

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# --- arguments ------------------------------------------------------------------------


def parse_steps(text: str) -> list[float]:
    """``1,10,50,100`` -> increasing percents in 0 < p <= 100."""
    steps: list[float] = []
    for part in text.split(","):
        try:
            p = float(part.strip().rstrip("%"))
        except ValueError:
            raise UsageError(
                f"--steps: {part.strip()!r} is not a percent (e.g. 1,10,50,100)"
            ) from None
        if not 0 < p <= 100:
            raise UsageError(f"--steps: {p:g} is not in 0 < p <= 100")
        if steps and p <= steps[-1]:
            raise UsageError(f"--steps: {p:g} after {steps[-1]:g}; steps must increase")
        steps.append(p)
    return steps


def parse_duration(text: str, flag: str = "--every") -> float:
    """``90``, ``2s``, ``10m``, ``1h30m``, ``1d`` -> seconds."""
    spec = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        return float(spec)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", spec)
    if not parts or "".join(n + u for n, u in parts) != spec:
        raise UsageError(f"{flag}: {text!r} is not a duration like 30s, 10m, 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def driver_id() -> str:
    """Unique per process, readable in the plan: which follower wrote it last."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


# --- CLI --------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "rollout",
        help="a staged rollout that drives itself (or one step by hand: --percent)",
        description="Create, follow, resume or abort a self-driving staged rollout "
        "(docs/fleet.md, 'Self-driving rollouts'); --percent sets one step by hand.",
    )
    p.add_argument("model", nargs="?", help="model name (none: --follow every running plan)")
    p.add_argument("--fleet", metavar="FLEET")
    p.add_argument("--steps", metavar="P,P,...", help="percents, e.g. 1,10,50,100")
    p.add_argument("--every", metavar="DURATION", help="time each step holds (30s, 10m, 1h)")
    p.add_argument("--halt-if", metavar="EXPR", help='e.g. "rejected>2%% or rolled_back>1%%"')
    p.add_argument("--promote-if", metavar="EXPR", help='also needed to widen, e.g. "active>=95%%"')
    p.add_argument("--rollback-on-halt", action="store_true",
                   help="on a halt, also roll the fleet back to the version before")  # fmt: skip
    where_argument(p)
    p.add_argument("--no-where", action="store_true",
                   help="drop the published tag selection (default: keep it)")  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="resume a halted plan at its step")
    mode.add_argument("--abort", action="store_true", help="stop the plan; the percent stays")
    mode.add_argument("--percent", type=float, metavar="P",
                      help="set the percent by hand (aborts a running plan)")  # fmt: skip
    p.add_argument("--follow", action="store_true",
                   help="drive the plan in the foreground until done or halted; without "
                   "MODEL, drive every running plan until stopped (the service)")  # fmt: skip
    p.add_argument("--poll", type=float, default=POLL_S, metavar="S",
                   help=f"seconds between two looks at the fleet (default {POLL_S:g})")  # fmt: skip
    key_argument(p, required=False)
    output_arguments(p, strict=True)
    add_broker_arguments(p)
    p.set_defaults(func=run)
    return p


def _need_key(args: argparse.Namespace, why: str) -> Path:
    if args.signing_key is None:
        raise UsageError(f"{why}: --signing-key (or $EDGE_SIGNING_KEY) is needed to re-sign")
    return Path(args.signing_key)


def _exit_on_sigterm() -> None:
    """SIGTERM ends a follower with exit 0, between two turns or inside one.

    As PID 1 of a container (the edge-fleet image under Kubernetes or podman) a process
    gets no default action for any signal: without a handler SIGTERM would be ignored
    until the kubelet's SIGKILL. The plan on the broker is the truth, so stopping
    inside a turn loses nothing; SystemExit still closes the MQTT session on the way out.
    """

    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def run(args: argparse.Namespace) -> int:
    if args.follow:
        _exit_on_sigterm()
    creating = args.steps is not None
    plan_flags = [f for f, v in (("--steps", args.steps), ("--every", args.every),
                  ("--halt-if", args.halt_if), ("--promote-if", args.promote_if),
                  ("--rollback-on-halt", args.rollback_on_halt)) if v]  # fmt: skip
    if args.model is None:
        if not args.follow or plan_flags or args.resume or args.abort or args.percent is not None:
            raise UsageError("MODEL: needed, except for `edge-fleet rollout --follow` alone")
        options = broker_options(args)
        key = _need_key(args, "--follow")
        follow(options, key, who=driver_id(), fleet=args.fleet, poll=args.poll)
        return 0
    model = _checked("MODEL", args.model)
    if not args.fleet:
        raise UsageError("--fleet: needed with MODEL")
    fleet = _checked("--fleet", args.fleet)
    if (args.resume or args.abort or args.percent is not None) and plan_flags:
        raise UsageError(f"{plan_flags[0]}: only when creating a plan (with --steps)")
    if plan_flags and not creating:
        raise UsageError(f"{plan_flags[0]}: needs --steps (a new plan)")
    if (args.where or args.no_where) and not (creating or args.percent is not None):
        raise UsageError("--where/--no-where: only with --steps (a new plan) or --percent")
    if args.where and args.no_where:
        raise UsageError("--where and --no-where: give one or the other")
    where = {} if args.no_where else (parse_where(args.where) if args.where else None)
    if (args.abort or args.percent is not None) and args.follow:
        raise UsageError("--follow: not with --abort or --percent")
    options = broker_options(args)
    who = driver_id()
    plan: dict[str, Any] | None
    if creating:
        if not args.every or not args.halt_if:
            raise UsageError("--steps: give --every and --halt-if too (docs/fleet.md)")
        steps, every_s = parse_steps(args.steps), parse_duration(args.every)
        parse(args.halt_if, "--halt-if")  # a typo fails before anything else happens
        if args.promote_if:
            parse(args.promote_if, "--promote-if")
        plan = create(
            options, model, fleet=fleet, steps=steps, every_s=every_s, halt_if=args.halt_if,
            promote_if=args.promote_if, rollback_on_halt=args.rollback_on_halt, where=where,
            key=_need_key(args, "--steps"), who=who, strict=args.strict,
        )  # fmt: skip
    elif args.resume:
        plan = change(options, model, fleet=fleet, action="resume", who=who,
                      key=_need_key(args, "--resume"))  # fmt: skip
    elif args.abort:
        plan = change(options, model, fleet=fleet, action="abort", who=who)
    elif args.percent is not None:
        # The by-hand step reports as `edge-fleet publish` does (result line, --json
        # document with what was published), plus the plan it aborted.
        report = Report(json=args.json)
        aborted = by_hand(options, model, fleet=fleet, percent=args.percent,
                          key=_need_key(args, "--percent"), who=who, where=where,
                          strict=args.strict, report=report)  # fmt: skip
        report.facts["aborted_plan"] = aborted
        report.finish()
        return 0
    elif not args.follow:
        shown = show(options, model, fleet)
        if args.json:
            print_json(shown)
        else:
            print(_describe(shown))
        return 0
    else:
        plan = None
    if args.follow:
        key = _need_key(args, "--follow")
        plan = follow(options, key, who=who, only=(fleet, model), poll=args.poll)
    if args.json:
        print_json(plan)
    elif plan is not None:
        print(_describe(plan))
    if args.follow and plan is not None and plan["state"] != rollouts.DONE:
        # Driven in the foreground to anything but done: a failure for the caller's script.
        raise RolloutError(f"{model} {plan['version']}: rollout {plan['state']}: {plan['reason']}")
    return 0


def _checked(flag: str, value: str) -> str:
    try:
        return check_name(flag, value)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _describe(plan: dict[str, Any]) -> str:
    head = f"{plan['model']} {plan['version']} on fleet {plan['fleet']}: {plan['state']}"
    lines = [f"{head} at {step_label(plan)}", f"  {plan.get('reason') or ''}".rstrip()]
    steps = ", ".join(f"{p:g}%" for p in plan["steps"])
    lines.append(f"  steps {steps} every {plan['every_s']:g} s; halt if {plan['halt_if']}"
                 + (f"; promote if {plan['promote_if']}" if plan.get("promote_if") else "")
                 + ("; rollback on halt" if plan["rollback_on_halt"] else ""))  # fmt: skip
    if plan.get("where"):
        lines.append("  where " + ", ".join(f"{k}={v}" for k, v in sorted(plan["where"].items())))
    if plan.get("progress"):
        lines.append(f"  targeted: {plan['progress']['line']}")
    return "\n".join(lines)
