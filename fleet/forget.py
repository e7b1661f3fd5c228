"""``edge-fleet forget DEVICE...``: clear what the broker retains about decommissioned devices.

Everything retained under ``edge/devices/{ID}/`` goes: the status (so ``status``, the
exporter and the known-device check stop listing it), its own desired state and history
per model, its enrolment record. They are found by reading what is retained there
(subscribing to ``edge/devices/{ID}/#`` until the barrier of ``fleet/retained.py``
comes back) and cleared with an empty retained message each, acknowledged by the broker.

An online device is refused unless ``--force``: it would publish its status again at
its next model change or reconnect, and clearing its own desired state while it runs
makes it fall back to its fleet's. The broker account is not touched: that is
``broker-config/mkcreds.sh remove ID`` (and a broker reload), said in the output too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from agent.wire.errors import EdgeError

from fleet.connection import add_broker_arguments, broker_options
from fleet.inventory import plain_name
from fleet.retained import Session
from fleet.term import print_json

SCHEMA_VERSION = 1
ACCOUNT_NOTE = (
    "broker accounts are untouched: remove each with broker-config/mkcreds.sh remove ID"
    " and reload the broker, or the device can still log in and publish"
)


class DeviceOnline(EdgeError):
    """A device to forget is online (without --force)."""


class NothingRetained(EdgeError):
    """A device named has nothing retained: unknown, or forgotten already."""


@dataclass
class Forgotten:
    device: str
    online: bool
    topics: list[str] = field(default_factory=list)  # full topics, status last

    def relative(self, prefix: str) -> list[str]:
        head = f"{prefix}/devices/{self.device}/"
        return [t.removeprefix(head) for t in self.topics]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "forget",
        help="clear a decommissioned device's retained topics (status, desired, enrolment)",
        description="Clear everything the broker retains under edge/devices/ID/ for each"
        " device: status, its own desired state and history, its enrolment record. Refuses"
        " an online device unless --force. Broker accounts are not touched"
        " (broker-config/mkcreds.sh remove ID).",
    )
    parser.add_argument("devices", nargs="+", metavar="DEVICE", type=plain_name("DEVICE"))
    parser.add_argument(
        "--force",
        action="store_true",
        help="forget online devices too (they publish their status again when they next can)",
    )
    parser.add_argument(
        "-n", "--dry-run", action="store_true", help="say what would be cleared, clear nothing"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (docs/fleet.md)")
    add_broker_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _online(payload: bytes | None) -> bool:
    if not payload:
        return False
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("state") == "online"


def find(session: Session, devices: list[str]) -> list[Forgotten]:
    """What the broker retains for each device (status last, so it goes last)."""
    t = session.topics
    retained = session.read_retained([f"{t.prefix}/devices/{d}/#" for d in devices])
    found = []
    for device in devices:
        head = f"{t.prefix}/devices/{device}/"
        status = t.status(device)
        topics = sorted(k for k in retained if k.startswith(head) and k != status)
        if status in retained:
            topics.append(status)
        found.append(Forgotten(device, _online(retained.get(status)), topics))
    return found


def clear(session: Session, forgotten: Forgotten) -> None:
    mids = [(session.publish(topic, b"", retain=True), topic) for topic in forgotten.topics]
    for mid, topic in mids:
        session.wait([mid], f"clearing {topic}")


def run(args: argparse.Namespace) -> int:
    options = broker_options(args)
    devices = list(dict.fromkeys(args.devices))  # once each, in the order given
    session = Session(options, purpose="forget")
    try:
        found = find(session, devices)
        online = [f.device for f in found if f.online and f.topics]
        if online and not args.force:
            raise DeviceOnline(
                f"{', '.join(online)}: online (its retained status says so); a forgotten device"
                " that is still online publishes its status again: stop its agent first, or"
                " give --force"
            )
        if not args.dry_run:
            for f in found:
                clear(session, f)
    finally:
        session.close()
    prefix = options.topic_prefix
    empty = [f.device for f in found if not f.topics]
    notes = [ACCOUNT_NOTE]
    if online:
        notes.append(
            f"{', '.join(online)} {'was' if len(online) == 1 else 'were'} online: a running"
            " agent publishes its status again at its next reconnect or model change"
        )
    if args.json:
        print_json(
            {
                "schema": SCHEMA_VERSION,
                "broker": options.url,
                "dry_run": bool(args.dry_run),
                "devices": [
                    {"device": f.device, "online": f.online, "cleared": f.topics} for f in found
                ],
                "notes": notes,
            }
        )
    else:
        verb = "would clear" if args.dry_run else "cleared"
        for f in found:
            if f.topics:
                print(f"{f.device}: {verb} {', '.join(f.relative(prefix))}")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    if empty:
        raise NothingRetained(
            f"{', '.join(empty)}: nothing retained under {prefix}/devices/ID/"
            " (an unknown device, or forgotten already)"
        )
    return 0
