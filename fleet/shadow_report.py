"""``edge-fleet shadow-report MODEL``: how a ``--shadow`` candidate compares, per device and
over the fleet, from what the devices already send.

Every device comparing a candidate reports the comparison in its health
(``models[name].shadow``: rows compared, agreement, confusion, error, latency) and the
counts in its retained status. The command subscribes to both, listens ``--wait``
seconds (health comes every ``health.interval_s``) and prints one row per device, then
the fleet-wide figures: agreement over all compared rows, the confusion cells summed
(disagreements first) and, for regressors, the worst p99 of the absolute difference.
A device heard only through its retained status shows its counts without the detail.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from agent.wire.errors import EdgeError

from fleet.connection import add_broker_arguments, broker_options, connect, disconnect
from fleet.inventory import plain_name
from fleet.state import DeviceState, FleetState
from fleet.term import render_table, width

COLUMNS = ("DEVICE", "FLEET", "ACTIVE", "CANDIDATE", "COMPARED", "AGREEMENT", "MOST DISAGREED",
           "ERROR P99", "P50 MS A/C")  # fmt: skip
CELLS = 10  # fleet-wide confusion cells shown


class NoShadow(EdgeError):
    """No device reports a shadow candidate of the model."""


def _device_row(d: DeviceState, model: str) -> dict[str, Any] | None:
    health = ((d.health or {}).get("models") or {}).get(model) or {}
    section = health.get("shadow") if isinstance(health, Mapping) else None
    status = ((d.status or {}).get("models") or {}).get(model) or {}
    retained = status.get("shadow") if isinstance(status, Mapping) else None
    if isinstance(section, Mapping):
        row = dict(section)
        row["source"] = "health"
    elif isinstance(retained, Mapping):
        row = {"version": retained.get("version"), "against": status.get("version"),
               "compared": retained.get("compared") or 0, "agreed": retained.get("agreed"),
               "source": "status"}  # fmt: skip
        agreed, compared = row["agreed"], row["compared"]
        row["agreement"] = round(agreed / compared, 4) if agreed is not None and compared else None
    else:
        return None
    return {"device": d.device, "fleet": d.fleet, **row}


def build_report(devices: list[DeviceState], model: str) -> dict[str, Any]:
    """Per device and fleet-wide figures of ``model``'s shadow candidates."""
    rows = [r for d in devices if (r := _device_row(d, model)) is not None]
    compared = sum(int(r.get("compared") or 0) for r in rows)
    labelled = [r for r in rows if r.get("agreed") is not None]
    agreed = sum(int(r["agreed"]) for r in labelled)
    labelled_rows = sum(int(r.get("compared") or 0) for r in labelled)
    cells: Counter[tuple[str, str]] = Counter()
    for r in rows:
        for a, c, n in r.get("confusion") or []:
            cells[(str(a), str(c))] += int(n)
    ranked = sorted(cells.items(), key=lambda kv: (kv[0][0] == kv[0][1], -kv[1]))
    p99s = [r["error"]["p99"] for r in rows if isinstance(r.get("error"), Mapping)]
    return {
        "model": model,
        "devices": rows,
        "fleet": {
            "devices": len(rows),
            "candidates": sorted({str(r.get("version")) for r in rows}),
            "compared": compared,
            "agreed": agreed if labelled else None,
            "agreement": round(agreed / labelled_rows, 4) if labelled_rows else None,
            "confusion": [[a, c, n] for (a, c), n in ranked[:CELLS]],
            "error_p99_max": max(p99s) if p99s else None,
        },
    }


def _most_disagreed(row: Mapping[str, Any]) -> str:
    for a, c, n in row.get("confusion") or []:
        if a != c:
            return f"{a} -> {c} ({n})"
    return "-" if row.get("source") == "health" else "(in health)"


def render(report: Mapping[str, Any], max_width: int = 100) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    body = []
    for r in report["devices"]:
        lat = r.get("latency_ms") or {}
        latency = (f"{num(lat.get('active_p50'), '.2f')}/{num(lat.get('candidate_p50'), '.2f')}"
                   if lat else "-")  # fmt: skip
        body.append((r["device"], r.get("fleet") or "", str(r.get("against") or "-"),
                     str(r.get("version") or "-"), str(r.get("compared") or 0),
                     num(r.get("agreement"), ".4f"), _most_disagreed(r),
                     num((r.get("error") or {}).get("p99"), ".4g"), latency))  # fmt: skip
    lines = [render_table(COLUMNS, body, max_width=max_width, right=(4, 5))]
    f = report["fleet"]
    lines.append(
        f"\n{report['model']}: {f['devices']} device(s) comparing {', '.join(f['candidates'])}; "
        f"{f['compared']} rows compared"
        + (f", agreement {f['agreed']}/{f['compared']} = {f['agreement']:.4f}"
           if f["agreement"] is not None else "")
        + (f", worst p99 of the difference {f['error_p99_max']:.4g}"
           if f["error_p99_max"] is not None else "")
    )  # fmt: skip
    disagreed = [(a, c, n) for a, c, n in f["confusion"] if a != c]
    if disagreed:
        lines.append("disagreements (active -> candidate): "
                     + ", ".join(f"{a} -> {c}: {n}" for a, c, n in disagreed))  # fmt: skip
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "shadow-report",
        help="how a --shadow candidate compares with the active version, per device and fleet",
        description="Listen to the devices' health and retained status and print, per device"
        " and over the fleet, how the candidate published with --shadow compares with the"
        " version it serves: rows compared, label agreement and confusion (classifiers),"
        " the difference's quantiles (regressors), latency of each.",
    )
    parser.add_argument("model", type=plain_name("MODEL"), help="the model")
    parser.add_argument("--fleet", type=plain_name("--fleet"), help="only devices of this fleet")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--wait", type=float, default=35.0, metavar="S",
                        help="listen this long for health (35, above the default 30 s "
                             "health interval); retained status is immediate")  # fmt: skip
    add_broker_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    options = broker_options(args)
    topics = options.topics
    fleet = FleetState(topics)

    def on_message(message: mqtt.MQTTMessage) -> None:
        fleet.receive(message.topic, message.payload, retained=bool(message.retain))

    client = connect(
        options, purpose="shadow-report",
        subscriptions=[(topics.all_status(), 1), (topics.all_health(), 0)],
        on_message=on_message,
    )  # fmt: skip
    try:
        threading.Event().wait(max(0.0, args.wait))
    finally:
        disconnect(client)
    report = build_report(fleet.snapshot(args.fleet), args.model)
    if not report["devices"]:
        where = f" of fleet {args.fleet}" if args.fleet else ""
        raise NoShadow(
            f"{args.model}: no device{where} reports a shadow candidate (publish one with "
            f"`edge-fleet publish PACKAGE --fleet F --shadow`; health comes every "
            f"health.interval_s, so --wait longer if one was just published)"
        )
    out.write((json.dumps(report, indent=2) if args.json else render(report, width(out))) + "\n")
    return 0
