"""``edge-fleet list`` and ``edge-fleet history``: what the broker holds as desired state.

``list`` shows every retained desired manifest (per fleet, and per device where a device
has its own), with serial, rollout percent and ``where`` tags, when it was issued and the
state of a self-driving rollout plan when one exists. ``history MODEL`` shows a target's
history of desired manifests (the rollback targets), newest first, marking the one that
is desired now.

Both only read, so a viewer account (read-only) is enough: the retained messages are
gathered by ``fleet.state.read_retained``, which needs no publish. Every payload is an
operator's JSON and is read defensively: a field of the wrong type is shown as ``-``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from agent.wire.names import name_problem
from agent.wire.times import parse_rfc3339

from fleet.connection import BrokerOptions, add_broker_arguments, broker_options
from fleet.retained import history_key
from fleet.state import DEVICE, FLEET, read_retained, subject_of
from fleet.term import print_json, render_table, width

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LIST_COLUMNS = ("TARGET", "MODEL", "VERSION", "SERIAL", "PERCENT", "WHERE", "ISSUED", "PLAN")
HISTORY_COLUMNS = ("TARGET", "MODEL", "VERSION", "SERIAL", "ISSUED AT", "SHA256", "DESIRED")


def plain_name(kind: str) -> Any:
    """An argparse type for a fleet, device or model name: a topic segment, no wildcards."""

    def check(text: str) -> str:
        problem = name_problem(kind, text)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text

    check.__name__ = kind
    return check


def add_parser(subparsers: Any) -> list[argparse.ArgumentParser]:
    listing: argparse.ArgumentParser = subparsers.add_parser(
        "list",
        help="models and versions desired per fleet and device, with rollout plans",
        description="Show every retained desired manifest: per fleet, and the devices that"
        " have their own; serial, rollout percent, where tags, issue time, rollout plan.",
    )
    listing.add_argument("--fleet", type=plain_name("--fleet"), help="only this fleet")
    listing.add_argument("--model", type=plain_name("--model"), help="only this model")
    listing.add_argument("--json", action="store_true", help="print JSON (docs/fleet.md)")
    _add_wait(listing)
    add_broker_arguments(listing)
    listing.set_defaults(func=run_list)

    history: argparse.ArgumentParser = subparsers.add_parser(
        "history",
        help="a model's published versions (rollback targets), newest first",
        description="Show the history of desired manifests of MODEL for a fleet or a device"
        " (all of them without --fleet/--device), newest first, marking the desired one.",
    )
    history.add_argument("model", metavar="MODEL", type=plain_name("MODEL"))
    target = history.add_mutually_exclusive_group()
    target.add_argument("--fleet", type=plain_name("--fleet"), help="this fleet's history")
    target.add_argument("--device", type=plain_name("--device"), help="this device's own")
    history.add_argument("--json", action="store_true", help="print JSON (docs/fleet.md)")
    _add_wait(history)
    add_broker_arguments(history)
    history.set_defaults(func=run_history)
    return [listing, history]


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="give up reading the retained state after this long (10)",
    )


def _object(payload: bytes, topic: str) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        log.warning("ignored %s: not JSON", topic)
        return None
    if not isinstance(data, dict):
        log.warning("ignored %s: not a JSON object", topic)
        return None
    return data


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _sha256(manifest: dict[str, Any]) -> str | None:
    artifact = manifest.get("artifact")
    return _str(artifact.get("sha256")) if isinstance(artifact, dict) else None


def _age(stamp: str | None, now: float) -> str:
    if stamp is None:
        return "-"
    try:
        seconds = max(0.0, now - parse_rfc3339(stamp).timestamp())
    except ValueError:
        return "?"
    for limit, unit, size in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds / 86400:.0f}d ago"


# --- edge-fleet list ---------------------------------------------------------------


def plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """The fields of a rollout plan (payload in agent/wire/rollouts.py) that list shows;
    anything of the wrong type becomes None rather than an error."""
    steps = plan.get("steps")
    steps = [s for s in steps if _number(s) is not None] if isinstance(steps, list) else []
    where = plan.get("where")
    return {
        "state": _str(plan.get("state")),
        "version": _str(plan.get("version")),
        "step": _int(plan.get("step")),
        "steps": steps,
        "percent": _number(plan.get("percent")),
        "reason": _str(plan.get("reason")),
        "where": where if isinstance(where, dict) else {},
        "started_at": _str(plan.get("started_at")),
        "updated_at": _str(plan.get("updated_at")),
    }


def plan_text(plan: dict[str, Any] | None) -> str:
    """``running 2/4``, ``halted 3/4``, ``done``: the plan's state and step, short."""
    if plan is None:
        return "-"
    state = plan["state"] or "?"
    step, steps = plan["step"], plan["steps"]
    if state in ("running", "halted") and step is not None and steps:
        return f"{state} {step + 1}/{len(steps)}"
    return state


def desired_entry(
    scope: str, name: str, model: str, manifest: dict[str, Any], fleet: str | None
) -> dict[str, Any]:
    """One desired manifest as list reports it."""
    rollout = manifest.get("rollout")
    rollout = rollout if isinstance(rollout, dict) else None
    percent = 100.0 if scope == FLEET else None
    where: dict[str, Any] = {}
    if rollout is not None:
        percent = _number(rollout.get("percent"))
        raw_where = rollout.get("where")
        where = raw_where if isinstance(raw_where, dict) else {}
    return {
        "scope": scope,
        "fleet": name if scope == FLEET else fleet,
        "device": name if scope == DEVICE else None,
        "model": model,
        "version": _str(manifest.get("version")),
        "serial": _int(manifest.get("serial")),
        "percent": percent,
        "where": {str(k): str(v) for k, v in where.items()},
        "issued_at": _str(manifest.get("issued_at")),
        "sha256": _sha256(manifest),
        "key_id": _str((manifest.get("signature") or {}).get("key_id"))
        if isinstance(manifest.get("signature"), dict)
        else None,
    }


def gather_list(
    retained: dict[str, bytes], options: BrokerOptions, fleet: str | None, model: str | None
) -> list[dict[str, Any]]:
    """The rows of ``list`` from the retained messages: fleets first, then their devices."""
    topics = options.topics
    device_fleet: dict[str, str] = {}
    desired: list[tuple[str, str, str, dict[str, Any]]] = []
    plans: dict[tuple[str, str], dict[str, Any]] = {}
    for topic, payload in retained.items():
        subject = subject_of(topics, topic)
        data = _object(payload, topic) if subject is not None else None
        if subject is None or data is None:
            continue
        kind, scope, name, m = subject
        if kind in ("status", "enrolment") and isinstance(data.get("fleet"), str):
            # The device's own word (status) wins over how it was enrolled.
            if kind == "status" or name not in device_fleet:
                device_fleet[name] = data["fleet"]
        elif kind == "desired" and m is not None:
            desired.append((scope, name, m, data))
        elif kind == "rollout" and m is not None:
            plans[(name, m)] = plan_summary(data)
    rows = []
    for scope, name, m, manifest in desired:
        entry = desired_entry(scope, name, m, manifest, device_fleet.get(name))
        if (fleet is not None and entry["fleet"] != fleet) or (model is not None and m != model):
            continue
        entry["rollout_plan"] = plans.pop((name, m), None) if scope == FLEET else None
        rows.append(entry)
    # A plan whose desired manifest is gone (cleared by hand) is still worth seeing.
    for (f, m), plan in plans.items():
        if (fleet is None or f == fleet) and (model is None or m == model):
            rows.append(
                {"scope": FLEET, "fleet": f, "device": None, "model": m, "version": None,
                 "serial": None, "percent": None, "where": {}, "issued_at": None,
                 "sha256": None, "key_id": None, "rollout_plan": plan}
            )  # fmt: skip
    rows.sort(
        key=lambda r: (r["fleet"] or "~", r["scope"] == DEVICE, r["device"] or "", r["model"])
    )
    return rows


def _list_cells(row: dict[str, Any], now: float) -> tuple[str, ...]:
    target = row["fleet"] or "?" if row["scope"] == FLEET else f"{row['device']} (device)"
    percent = "-" if row["percent"] is None else f"{row['percent']:g}%"
    where = ",".join(f"{k}={v}" for k, v in sorted(row["where"].items())) or "-"
    return (
        target,
        row["model"],
        row["version"] or "-",
        "-" if row["serial"] is None else str(row["serial"]),
        percent,
        where,
        _age(row["issued_at"], now),
        plan_text(row["rollout_plan"]),
    )


def run_list(args: argparse.Namespace) -> int:
    options = broker_options(args)
    t = options.topics
    f = args.fleet or "+"
    m = args.model or "+"
    filters = [
        f"{t.prefix}/fleets/{f}/models/{m}/desired",
        f"{t.prefix}/fleets/{f}/models/{m}/rollout",
        f"{t.prefix}/devices/+/models/{m}/desired",
        t.all_status(),
        t.all_enrolments(),
    ]
    retained = read_retained(options, filters, purpose="list", timeout=args.wait)
    rows = gather_list(retained, options, args.fleet, args.model)
    if args.json:
        print_json({"schema": SCHEMA_VERSION, "broker": options.url, "desired": rows})
        return 0
    if not rows:
        where = f" for fleet {args.fleet}" if args.fleet else ""
        print(f"nothing is desired{where} on {options.url}", file=sys.stderr)
        return 0
    now = time.time()
    print(
        render_table(
            LIST_COLUMNS, [_list_cells(r, now) for r in rows], max_width=width(), right=(3, 4)
        )
    )
    for r in rows:
        plan = r["rollout_plan"]
        if plan is not None and plan["reason"] and plan["state"] in ("halted", "aborted"):
            print(f"{r['fleet']} {r['model']}: rollout {plan['state']}: {plan['reason']}")
    return 0


# --- edge-fleet history ------------------------------------------------------------


def gather_history(
    retained: dict[str, bytes], options: BrokerOptions, model: str
) -> list[dict[str, Any]]:
    """Every history entry of ``model``, per target newest first (by serial)."""
    topics = options.topics
    desired_now: dict[tuple[str, str], tuple[Any, Any]] = {}
    histories: dict[tuple[str, str], list[dict[str, Any]]] = {}
    head = topics.prefix.split("/")
    for topic, payload in retained.items():
        parts = topic.split("/")[len(head) :]
        if len(parts) != 5 or parts[0] not in ("fleets", "devices") or parts[3] != model:
            continue
        data = _object(payload, topic)
        if data is None:
            continue
        key = (FLEET if parts[0] == "fleets" else DEVICE, parts[1])
        if parts[4] == "desired":
            desired_now[key] = history_key(data)
        elif parts[4] == "history":
            entries = data.get("entries")
            histories[key] = (
                [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
            )
    rows = []
    for (scope, name), entries in sorted(
        histories.items(), key=lambda kv: (kv[0][0] == DEVICE, kv[0][1])
    ):
        now_sha = desired_now.get((scope, name))
        ordered = sorted(entries, key=lambda e: _int(e.get("serial")) or 0, reverse=True)
        for entry in ordered:
            sha = _sha256(entry)
            now = history_key(entry) == now_sha
            rows.append(
                {
                    "scope": scope,
                    "fleet": name if scope == FLEET else None,
                    "device": name if scope == DEVICE else None,
                    "model": model,
                    "version": _str(entry.get("version")),
                    "serial": _int(entry.get("serial")),
                    "issued_at": _str(entry.get("issued_at")),
                    "sha256": sha,
                    "desired": sha is not None and now,
                }
            )
    return rows


def run_history(args: argparse.Namespace) -> int:
    options = broker_options(args)
    t = options.topics
    if args.fleet:
        filters = [t.fleet_history(args.fleet, args.model), t.fleet_desired(args.fleet, args.model)]
    elif args.device:
        filters = [
            t.device_history(args.device, args.model),
            t.device_desired(args.device, args.model),
        ]
    else:
        filters = [t.fleet_history("+", args.model), t.fleet_desired("+", args.model),
                   t.device_history("+", args.model), t.device_desired("+", args.model)]  # fmt: skip
    retained = read_retained(options, filters, purpose="history", timeout=args.wait)
    rows = gather_history(retained, options, args.model)
    if args.json:
        print_json({"schema": SCHEMA_VERSION, "broker": options.url, "history": rows})
        return 0
    if not rows:
        target = (
            f"fleet {args.fleet}"
            if args.fleet
            else f"device {args.device}"
            if args.device
            else "any fleet or device"
        )
        print(f"no history of {args.model} for {target} on {options.url}", file=sys.stderr)
        return 0
    cells = [
        (
            r["fleet"] if r["scope"] == FLEET else f"{r['device']} (device)",
            r["model"],
            r["version"] or "-",
            "-" if r["serial"] is None else str(r["serial"]),
            r["issued_at"] or "-",
            (r["sha256"] or "-")[:12],
            "*" if r["desired"] else "",
        )
        for r in rows
    ]
    print(render_table(HISTORY_COLUMNS, cells, max_width=width(), right=(3,)))
    return 0
