"""``edge-fleet status``: one row per device and model, desired against actual.

Retained status arrives as soon as the subscription is made, and so do the retained
desired manifests (fleet and device), rollout plans and enrolment records; health comes
every ``health.interval_s``, so the command listens for ``--wait`` seconds and prints
what it knows, with how long ago each device was last heard from.

Each row says which version the broker wants the device to run (the device's own
desired state, else its fleet's), which it runs, the state ``fleet/progress.py`` judges
from both (active, probation, updating, rejected, rolled_back, not_in_rollout, offline)
and why: a device that refused a version keeps serving the older one, and "active"
alone would hide that. Under the table, per fleet and model, the rollout summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import paho.mqtt.client as mqtt

from fleet import progress
from fleet.connection import add_broker_arguments, broker_options, connect, disconnect
from fleet.inventory import plain_name, plan_summary, plan_text
from fleet.progress import DeviceProgress
from fleet.state import DeviceState, FleetState
from fleet.term import render_table as fit_table
from fleet.term import width

SCHEMA_VERSION = 1
COLUMNS = ("DEVICE", "FLEET", "MODEL", "VERSION", "DESIRED", "STATE", "SEEN", "P99", "BACKLOG")
REASON_INDENT = "    "
REASON_LINES = 3
# Per model in --json: the device's status and health figures (then desired, deployment).
MODEL_FIELDS = ("version", "previous", "state", "serial", "inferences", "errors", "p50_ms",
                "p99_ms", "reason")  # fmt: skip
_CLEAR = "\x1b[H\x1b[2J"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="one row per device and model: desired and actual version, state, reason",
        description="Show the fleet from the devices' retained status, the desired state"
        " the broker retains and the devices' latest health: per device and model the"
        " desired and actual version, the deployment state and why, and per fleet and"
        " model a rollout summary.",
    )
    parser.add_argument(
        "--fleet", metavar="FLEET", type=plain_name("--fleet"), help="only devices of this fleet"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (schema in docs/fleet.md)")
    parser.add_argument(
        "--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C"
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="redraw period for --watch (2)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=3.0,
        metavar="S",
        help="listen this long for health before printing (3); retained status is immediate",
    )
    add_broker_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _duration(seconds: float | None) -> str:
    return _age(seconds).removesuffix(" ago")


@dataclass
class View:
    """One frame: the devices, each model's classification, the summaries per fleet and model."""

    devices: list[DeviceState]
    rows: dict[str, dict[str, DeviceProgress]] = field(default_factory=dict)
    summaries: dict[tuple[str, str], progress.Summary] = field(default_factory=dict)
    plans: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def online(self) -> int:
        return sum(1 for d in self.devices if d.state == "online")


def build_view(fleet: FleetState, only: str | None = None) -> View:
    """Classify every device's models against what the broker desires of it."""
    view = View(fleet.snapshot(only))
    grouped: dict[tuple[str, str], list[DeviceProgress]] = {}
    for d in view.devices:
        desired = fleet.desired_for(d)
        names = sorted(set(d.models()) | set(desired))
        rows = {name: progress.classify(name, d, desired.get(name, {})) for name in names}
        view.rows[d.device] = rows
        for name, row in rows.items():
            if row.source is not None:  # nothing desired: not part of any rollout
                grouped.setdefault((d.fleet or "?", name), []).append(row)
    view.summaries = {key: progress.summarize(rows) for key, rows in sorted(grouped.items())}
    view.plans = {
        key: plan_summary(plan)
        for key, plan in fleet.rollouts().items()
        if only is None or key[0] == only
    }
    return view


def device_json(
    d: DeviceState, now: float, rows: dict[str, DeviceProgress] | None = None
) -> dict[str, Any]:
    """One device in the stable ``--json`` schema (docs/fleet.md); ``rows`` are its
    models' classifications (``progress.classify``)."""
    rows = rows or {}
    health = d.health or {}
    status = d.status or {}
    models = d.models()
    p99s = [m["p99_ms"] for m in models.values() if isinstance(m["p99_ms"], int | float)]
    raw_buffer = health.get("buffer")
    buffer: dict[str, Any] | None = raw_buffer if isinstance(raw_buffer, dict) else None
    raw_memory = health.get("memory")
    memory: dict[str, Any] = raw_memory if isinstance(raw_memory, dict) else {}
    return {
        "device": d.device,
        "fleet": d.fleet,
        "state": d.state,
        "since": status.get("since"),
        "agent_version": status.get("agent_version") or health.get("agent_version"),
        "last_seen_age_s": None if d.last_seen_at is None else round(now - d.last_seen_at, 3),
        "health_age_s": None if d.health_at is None else round(now - d.health_at, 3),
        "health_time": health.get("time"),
        # A model desired but not installed yet is a row too (updating, not in rollout).
        "models": {
            name: {k: models.get(name, {}).get(k) for k in MODEL_FIELDS}
            | _progress_json(rows.get(name))
            for name in sorted(set(models) | set(rows))
        },
        "p99_ms": max(p99s) if p99s else None,
        "buffer": None
        if buffer is None
        else {
            "rows": buffer.get("rows"),
            "bytes": buffer.get("bytes"),
            "oldest_age_s": buffer.get("oldest_age_s"),
            "dropped": buffer.get("dropped") or {},
        },
        "cpu_percent": health.get("cpu_percent"),
        "memory_available": memory.get("available"),
        "agent_rss": memory.get("agent_rss"),
        "disk_free_bytes": health.get("disk_free_bytes"),
        "soc_temp_c": health.get("soc_temp_c"),
        "tags": d.tags,
        "enrolled_at": (d.enrolment or {}).get("enrolled_at"),
    }


def _progress_json(row: DeviceProgress | None) -> dict[str, Any]:
    """The fields added to a model of ``--json``: what is desired, and the judgement."""
    if row is None or row.source is None:
        return {"desired": None, "deployment": None}
    return {
        "desired": {
            "version": row.desired_version,
            "serial": row.desired_serial,
            "source": row.source,
        },
        "deployment": {"state": row.state, "reason": row.reason or None, "targeted": row.targeted},
    }


def render_json(view: View, broker: str, now: float, *, lines: bool = False) -> str:
    """The ``--json`` document; one compact line per frame with ``lines`` (``--watch``)."""
    document = {
        "schema": SCHEMA_VERSION,
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "broker": broker,
        "devices": [device_json(d, now, view.rows.get(d.device)) for d in view.devices],
        "online": view.online,
        "summary": [
            {
                "fleet": fleet,
                "model": model,
                **summary.as_dict(),
                "rollout": view.plans.get((fleet, model)),
            }
            for (fleet, model), summary in view.summaries.items()
        ],
    }
    return json.dumps(document, separators=(",", ":")) if lines else json.dumps(document, indent=2)


def _state(d: DeviceState, model: dict[str, Any]) -> tuple[str, str]:
    """STATE and reason of one model row: the judgement when something is desired, else
    what the device says (a model installed by hand is not part of a rollout)."""
    deployment = model.get("deployment")
    if deployment is not None:
        return deployment["state"], deployment["reason"] or ""
    if d.state == "offline":
        return "offline", ""
    return model.get("state") or d.state, model.get("reason") or ""


def _backlog(buf: dict[str, Any] | None) -> str:
    if buf is None or buf.get("rows") is None:
        return "-"
    if not buf["rows"]:
        return "0"
    return f"{buf['rows']} ({_duration(buf.get('oldest_age_s'))})"


def _rows(d: DeviceState, doc: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """The table rows of one device (one per model, one for a device without any),
    each with the reason printed under it."""
    seen, backlog = _age(doc["last_seen_age_s"]), _backlog(doc["buffer"])
    if not doc["models"]:
        reason = "" if d.status is not None else "enrolled, no status yet" if d.enrolment else ""
        cells = (d.device, doc["fleet"] or "-", "-", "-", "-", d.state, seen, "-", backlog)
        return [(cells, reason)]
    out: list[tuple[tuple[str, ...], str]] = []
    for name, m in doc["models"].items():
        state, reason = _state(d, m)
        desired = (m.get("desired") or {}).get("version") or "-"
        p99 = "-" if m["p99_ms"] is None else f"{m['p99_ms']:.1f}ms"
        cells = (d.device, doc["fleet"] or "-", name, m["version"] or "-", desired, state,
                 seen, p99, backlog)  # fmt: skip
        out.append((cells, "" if state == "active" else reason))
    return out


def _wrap(reason: str, max_width: int) -> list[str]:
    """A reason under its row: wrapped (it is the point of the row), three lines at most."""
    return textwrap.wrap(
        reason,
        width=max(20, max_width - len(REASON_INDENT)),
        max_lines=REASON_LINES,
        placeholder=" …",
        initial_indent=REASON_INDENT,
        subsequent_indent=REASON_INDENT,
    )


def _plan_line(plan: dict[str, Any]) -> str:
    """``rollout running 3/4 (50%)``, and why when it halted or was aborted."""
    text = f"rollout {plan_text(plan)}"
    if plan["percent"] is not None:
        text += f" ({plan['percent']:g}%)"
    if plan["reason"] and plan["state"] in ("halted", "aborted"):
        text += f": {plan['reason']}"
    return text


def render_table(view: View, now: float, max_width: int = 80) -> str:
    """One row per device and model within ``max_width``, each reason on the line under
    its row; then the rollout summary per fleet and model, and the device count."""
    rows: list[tuple[tuple[str, ...], str]] = []
    for d in view.devices:
        rows += _rows(d, device_json(d, now, view.rows.get(d.device)))
    columns: list[int] = list(range(len(COLUMNS)))
    if len({d.fleet for d in view.devices}) <= 1:
        columns.remove(1)  # one fleet: the column would say the same on every row
    table = fit_table(
        [COLUMNS[i] for i in columns],
        [[cells[i] for i in columns] for cells, _ in rows],
        max_width=max_width,
        right=tuple(columns.index(i) for i in (7,)),
    ).splitlines()
    lines = table[:1]
    for text, (_, reason) in zip(table[1:], rows, strict=True):
        lines.append(text)
        if reason:
            lines += _wrap(reason, max_width)
    for (fleet, model), summary in view.summaries.items():
        lines += textwrap.wrap(f"{model} ({fleet}): {summary.line()}", width=max_width,
                               subsequent_indent="  ")  # fmt: skip
        plan = view.plans.get((fleet, model))
        if plan is not None:
            lines += _wrap(_plan_line(plan), max_width)
    lines.append(f"{len(view.devices)} devices, {view.online} online")
    return "\n".join(lines)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    options = broker_options(args)
    topics = options.topics
    fleet = FleetState(topics)

    def on_message(message: mqtt.MQTTMessage) -> None:
        fleet.receive(message.topic, message.payload, retained=bool(message.retain))

    client = connect(
        options,
        purpose="status",
        subscriptions=[
            (topics.all_status(), 1),
            (topics.all_health(), 0),
            # What is desired (retained), so a refusal is not shown as "active".
            (topics.fleet_desired("+", "+"), 1),
            (topics.device_desired("+", "+"), 1),
            (topics.all_rollouts(), 1),
            (topics.all_enrolments(), 1),
        ],
        on_message=on_message,
    )
    stop = threading.Event()
    try:
        stop.wait(max(0.0, args.wait))
        while True:
            now = time.time()
            view = build_view(fleet, args.fleet)
            text = (
                render_json(view, client.url, now, lines=args.watch)
                if args.json
                else render_table(view, now, width(out))
            )
            if args.watch and out.isatty():
                out.write(_CLEAR)
            out.write(text + "\n")
            out.flush()
            if not args.watch or stop.wait(max(0.1, args.interval)):
                break
    except KeyboardInterrupt:
        pass  # Ctrl-C ends --watch: that is the normal way out
    finally:
        disconnect(client)
    return 0
