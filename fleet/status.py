"""``edge-fleet status``: one row per device, from retained status and the latest health.

Retained status arrives as soon as the subscription is made; health comes every
``health.interval_s``, so the command listens for ``--wait`` seconds and prints what
it knows, with how long ago each device was last heard from.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import paho.mqtt.client as mqtt

from fleet.connection import add_broker_arguments, broker_options, connect, disconnect
from fleet.state import DeviceState, FleetState

SCHEMA_VERSION = 1
COLUMNS = ("DEVICE", "FLEET", "STATE", "MODELS", "DEPLOYMENT", "LAST SEEN", "P99", "BACKLOG")
_CLEAR = "\x1b[H\x1b[2J"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="one row per device: online, models, deployment, last seen, p99, backlog",
        description="Show the fleet from the devices' retained status and their latest health.",
    )
    parser.add_argument("--fleet", metavar="FLEET", help="only devices of this fleet")
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


def device_json(d: DeviceState, now: float) -> dict[str, Any]:
    """One device in the stable ``--json`` schema (docs/fleet.md)."""
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
        "models": {
            name: {
                k: m[k]
                for k in (
                    "version",
                    "previous",
                    "state",
                    "serial",
                    "inferences",
                    "errors",
                    "p50_ms",
                    "p99_ms",
                )
            }
            for name, m in models.items()
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
    }


def render_json(devices: list[DeviceState], broker: str, now: float, *, lines: bool = False) -> str:
    """The ``--json`` document; one compact line per frame with ``lines`` (``--watch``)."""
    document = {
        "schema": SCHEMA_VERSION,
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "broker": broker,
        "devices": [device_json(d, now) for d in devices],
    }
    return json.dumps(document, separators=(",", ":")) if lines else json.dumps(document, indent=2)


def _row(d: dict[str, Any]) -> tuple[str, ...]:
    models = d["models"]
    listed = ", ".join(f"{n} {m['version'] or '?'}" for n, m in models.items()) or "-"
    states = {n: m["state"] for n, m in models.items() if m["state"]}
    if not states:
        deployment = "-"
    elif all(s == "active" for s in states.values()):
        deployment = "active"
    else:
        deployment = ", ".join(f"{n} {s}" for n, s in states.items() if s != "active")
    p99 = "-" if d["p99_ms"] is None else f"{d['p99_ms']:.1f}ms"
    buf = d["buffer"]
    if buf is None or buf.get("rows") is None:
        backlog = "-"
    elif not buf["rows"]:
        backlog = "0"
    else:
        backlog = f"{buf['rows']} ({_duration(buf.get('oldest_age_s'))})"
    return (
        d["device"],
        d["fleet"] or "-",
        d["state"],
        listed,
        deployment,
        _age(d["last_seen_age_s"]),
        p99,
        backlog,
    )


def render_table(devices: list[DeviceState], now: float) -> str:
    """Aligned columns, one row per device; the last column is not padded."""
    rows = [COLUMNS, *(_row(device_json(d, now)) for d in devices)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    online = sum(1 for d in devices if d.state == "online")
    lines.append(f"{len(devices)} devices, {online} online")
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
        subscriptions=[(topics.all_status(), 1), (topics.all_health(), 0)],
        on_message=on_message,
    )
    stop = threading.Event()
    try:
        stop.wait(max(0.0, args.wait))
        while True:
            now = time.time()
            devices = fleet.snapshot(args.fleet)
            text = (
                render_json(devices, options.url, now, lines=args.watch)
                if args.json
                else render_table(devices, now)
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
