"""``edge-fleet events``: deployment events with their reasons, one line each.

Devices publish events (``downloading`` .. ``activated``, ``rejected``, ``rolled_back``,
``not_in_rollout``, command answers) on ``edge/devices/{device}/events`` with QoS 1 and
not retained: the broker keeps none for a late reader. So this command shows what the
collector stored (``--db URL``, the database ``edge-fleet collect`` writes), what arrives
while it listens (``--follow`` until Ctrl-C; without ``--db`` and ``--follow``, for
``--wait`` seconds), or both: with ``--db --follow`` it subscribes first, prints the
stored events, then the live ones, each event once (the collector's digest of the
payload tells a stored event from its live copy).

Events carry no fleet; ``--fleet`` is resolved through the devices' retained status
and enrolment records (live) or the collector's stored status (``--db``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from agent.wire import payloads
from agent.wire.payloads import InvalidPayload
from agent.wire.times import parse_rfc3339, rfc3339

from fleet.connection import add_broker_arguments, broker_options, connect, disconnect
from fleet.db import open_database
from fleet.inventory import plain_name
from fleet.results import TIME_HELP, parse_time
from fleet.state import FleetState
from fleet.term import print_json

SCHEMA_VERSION = 1
DEFAULT_LIMIT = 100
DEFAULT_WAIT_S = 10.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "events",
        help="deployment events with reasons: stored (--db), live (--follow), or both",
        description="Show deployment events (downloading, verified, activated, rejected,"
        " rolled_back, not_in_rollout, command answers) with their reasons. Events are not"
        " retained: --db reads the ones the collector stored, --follow keeps listening;"
        " with neither, the command listens for --wait seconds.",
    )
    parser.add_argument("--fleet", type=plain_name("--fleet"), help="only devices of this fleet")
    parser.add_argument("--device", type=plain_name("--device"), help="only this device")
    parser.add_argument("--model", type=plain_name("--model"), help="only this model")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the collector's database (sqlite:///PATH or postgresql://...): stored events",
    )
    parser.add_argument(
        "--since", metavar="T", help=f"stored events from this time on (--db); {TIME_HELP}"
    )
    parser.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most the newest N stored events ({DEFAULT_LIMIT}; 0: all)",
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing live events until Ctrl-C"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="S",
        help=f"without --db or --follow: listen this long ({DEFAULT_WAIT_S:g})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON document; with --follow one JSON object per line",
    )
    add_broker_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 or more")
    return value


# --- one event, whichever way it came -----------------------------------------------


def from_payload(body: dict[str, Any], digest: str) -> dict[str, Any]:
    """The fields every view of an event has, from a checked payload."""
    try:
        at: float | None = parse_rfc3339(body["time"]).timestamp()
    except (KeyError, ValueError):
        at = None
    return {
        "time": rfc3339(at) if at is not None else body.get("time"),
        "epoch": at,
        "device": body.get("device"),
        "event": body.get("event"),
        "model": body.get("model"),
        "version": body.get("version"),
        "serial": body.get("serial"),
        "reason": body.get("reason"),
        "detail": detail(body),
        "digest": digest,
        "payload": body,
    }


def from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the collector's events table."""
    body = row["payload"] if isinstance(row["payload"], dict) else {}
    event = from_payload({**body, "device": row["device"]}, row["digest"])
    event.update(
        time=rfc3339(row["time"]), epoch=row["time"], event=row["event"], model=row["model"],
        version=row["version"], serial=row["serial"], reason=row["reason"],
    )  # fmt: skip
    return event


def detail(body: dict[str, Any]) -> str:
    """What the line says after the version: the reason, and the fields that explain it."""
    parts = []
    if body.get("event") == payloads.COMMAND:
        ok = body.get("ok")
        parts.append(f"{body.get('command', '?')} {'ok' if ok else 'failed'}")
        if body.get("error"):
            parts.append(str(body["error"]))
    if body.get("from_version"):
        parts.append(f"from {body['from_version']}")
    if body.get("event") == payloads.ACTIVATED and body.get("previous"):
        parts.append(f"was {body['previous']}")
    if body.get("event") == payloads.VERIFIED and body.get("artifact_source"):
        parts.append(f"from {body.get('url') or body['artifact_source']}")
    if body.get("event") == payloads.DOWNLOADING and isinstance(body.get("chunks"), int):
        parts.append(f"{body.get('have', 0)}/{body['chunks']} chunks")
    if body.get("reason"):
        parts.append(str(body["reason"]))
    if body.get("retry") is True:
        parts.append("(will retry)")
    return "; ".join(parts)


def line(event: dict[str, Any]) -> str:
    """``TIME  DEVICE  MODEL VERSION  EVENT  DETAIL``: the time in UTC to the second."""
    stamp = str(event["time"] or "?")
    if len(stamp) == 24 and stamp.endswith("Z"):
        stamp = stamp[:19] + "Z"  # milliseconds add nothing to a reading
    what = " ".join(str(x) for x in (event["model"], event["version"]) if x) or "-"
    text = f"{stamp}  {event['device'] or '?':<12}  {what:<14}  {event['event'] or '?':<14}"
    return f"{text}  {event['detail']}".rstrip() if event["detail"] else text.rstrip()


# --- the command ------------------------------------------------------------------


class _Live:
    """The live side: events arriving (queued), and the fleets of devices for --fleet."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.options = broker_options(args)
        self.topics = self.options.topics
        self.fleet = FleetState(self.topics)
        self.queue: queue.Queue[tuple[bytes, str]] = queue.Queue()
        subs = [(self.topics.events(args.device) if args.device else self.topics.all_events(), 1)]
        if args.fleet:
            subs += [(self.topics.all_status(), 1), (self.topics.all_enrolments(), 1)]
        self.client = connect(
            self.options, purpose="events", subscriptions=subs, on_message=self._on_message
        )

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        if message.topic.endswith("/events"):
            if not message.retain:  # a retained "event" is someone's mistake, not news
                self.queue.put((bytes(message.payload), message.topic))
        else:
            self.fleet.receive(message.topic, message.payload, retained=bool(message.retain))

    def fleet_of(self, device: str) -> str | None:
        for d in self.fleet.snapshot():
            if d.device == device:
                return d.fleet
        return None

    def close(self) -> None:
        disconnect(self.client)


def _decode(payload: bytes, topic: str, topics: Any) -> dict[str, Any] | None:
    try:
        body = payloads.check_event(payloads.decode(payload, topic), topic)
    except InvalidPayload as e:
        print(f"edge-fleet events: ignored: {e}", file=sys.stderr)
        return None
    device = topics.device_of(topic)
    if body.get("device") not in (None, device):
        print(
            f"edge-fleet events: ignored {topic}: names device {body['device']!r}", file=sys.stderr
        )
        return None
    body["device"] = device
    return from_payload(body, hashlib.sha256(payload).hexdigest())


def _matches(event: dict[str, Any], args: argparse.Namespace, fleet_of: Any) -> bool:
    if args.device and event["device"] != args.device:
        return False
    if args.model and event["model"] != args.model:
        return False
    return not (args.fleet and fleet_of(event["device"]) != args.fleet)


def _print(events: Iterable[dict[str, Any]], out: TextIO, *, json_lines: bool) -> int:
    n = 0
    for e in events:
        out.write((json.dumps(_public(e), separators=(",", ":")) if json_lines else line(e)) + "\n")
        n += 1
    out.flush()
    return n


def _public(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("epoch", "digest")}


def stored(args: argparse.Namespace) -> list[dict[str, Any]]:
    since = None if args.since is None else parse_time(args.since, "--since")
    db = open_database(args.db, create=False)
    try:
        rows = db.query_events(
            device=args.device, fleet=args.fleet, model=args.model, since=since,
            limit=args.limit or None,
        )  # fmt: skip
    finally:
        db.close()
    return [from_row(r) for r in rows]


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.since is not None and not args.db:
        print(
            "edge-fleet events: --since applies to stored events (--db); ignored", file=sys.stderr
        )
    live = _Live(args) if args.follow or not args.db else None
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        seen: set[str] = set()
        shown: list[dict[str, Any]] = []
        if args.db:
            for e in stored(args):
                seen.add(e["digest"])
                shown.append(e)
            if args.follow and not args.json:
                _print(shown, out, json_lines=False)
            elif args.follow:
                _print(shown, out, json_lines=True)
        if live is None:
            return _finish(args, shown, out, source="db")
        deadline = None if args.follow else time.monotonic() + max(0.0, args.wait)
        try:
            while not stop.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    payload, topic = live.queue.get(timeout=0.2 if left is None else min(left, 0.2))
                except queue.Empty:
                    continue
                event = _decode(payload, topic, live.topics)
                if event is None or event["digest"] in seen:
                    continue
                seen.add(event["digest"])
                if not _matches(event, args, live.fleet_of):
                    continue
                if args.follow:
                    _print([event], out, json_lines=args.json)
                else:
                    shown.append(event)
        except KeyboardInterrupt:
            pass  # Ctrl-C ends --follow: the normal way out
        if args.follow:
            return 0
        if not shown and not args.json:
            print(
                f"no events in {args.wait:g} s (events are not retained: --db URL reads the"
                " ones the collector stored, --follow keeps listening)",
                file=sys.stderr,
            )
        return _finish(args, shown, out, source="live")
    finally:
        if live is not None:
            live.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _finish(
    args: argparse.Namespace, events: list[dict[str, Any]], out: TextIO, *, source: str
) -> int:
    if args.json:
        print_json(
            {"schema": SCHEMA_VERSION, "source": source, "events": [_public(e) for e in events]},
            out,
        )
    else:
        _print(events, out, json_lines=False)
    return 0
