"""``edge-fleet enroll DEVICE... --fleet F``: broker accounts, ACL entries and device bundles.

Run on the broker's host (it writes the broker's configuration folder, as
``broker-config/mkcreds.sh`` does, through the same ``fleet/accounts.py``). For each
device: a fresh password in the device listeners' password file, the device's ACL
block (its fleet's desired state), and a bundle (``fleet/bundle.py``) that
``scripts/install-pi.sh --bundle`` installs on the device. With ``--broker`` (or
``$EDGE_BROKER``) it also publishes each device's retained enrolment record
(``agent.wire.payloads.enrolment``), so ``publish`` and ``status`` know the device
before it first connects.

Everything is checked before anything is written: names, tags, the CSV, the files, an
account that exists already (renewing it cuts the device off until its new bundle is
installed, so that takes ``--renew``), and the broker connection.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.wire import payloads
from agent.wire.errors import UsageError
from agent.wire.names import is_name, name_problem
from agent.wire.signing import load_public_key
from agent.wire.targeting import parse_tags
from agent.wire.topics import Topics

from fleet.accounts import DEFAULT_CONF_DIR, DEVICES, AccountError, BrokerConf, role_account
from fleet.bundle import CA_FILE, PASSWORD_FILE, DeviceSetup, write_bundle
from fleet.connection import add_broker_arguments, broker_options
from fleet.retained import Session
from fleet.term import print_json, render_table, width

CSV_COLUMNS = ("device", "fleet", "tags")


@dataclass(frozen=True)
class Enrolee:
    device: str
    fleet: str
    tags: dict[str, str] = field(default_factory=dict)


def tags_of(items: Iterable[str], where: str) -> dict[str, str]:
    """``["site=north", "ring=canary,zone=2"]`` -> a dict, by the agent's own rule
    (``agent.wire.targeting.parse_tags``: names on both sides)."""
    try:
        return parse_tags(",".join(items), where)
    except ValueError as e:
        raise UsageError(str(e)) from None


def read_csv(path: Path, fleet: str | None, tags: dict[str, str]) -> list[Enrolee]:
    """Rows of ``device,fleet,tags`` (tags ``k=v;k=v``); an empty cell takes the option's."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's BOM is not a column
    except OSError as e:
        raise UsageError(f"--csv: {path}: {e.strerror or e}") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if unknown:
        raise UsageError(
            f"{path}: unknown column {unknown[0]!r} (the columns are {', '.join(CSV_COLUMNS)})"
        )
    if "device" not in columns:
        raise UsageError(f"{path}: no 'device' column (the columns are {', '.join(CSV_COLUMNS)})")
    rows = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise UsageError(f"{where}: more cells than the {len(columns)} columns")
        cells = {k.strip(): (v or "").strip() for k, v in row.items()}
        if not any(cells.values()):
            continue  # a blank line
        row_fleet = cells.get("fleet") or fleet
        if not row_fleet:
            raise UsageError(f"{where}: {cells['device']}: no fleet (a fleet cell or --fleet)")
        # k=v;k=v in a cell: a comma would split the CSV column.
        row_tags = {**tags, **tags_of(cells.get("tags", "").split(";"), f"{where}: tags")}
        rows.append(Enrolee(_name(where, "device", cells["device"]),
                            _name(where, "fleet", row_fleet), row_tags))  # fmt: skip
    return rows


def _name(where: str, kind: str, value: str) -> str:
    problem = name_problem(kind, value)
    if problem:
        raise UsageError(f"{where}: {problem}")
    return value


def plan(args: argparse.Namespace) -> list[Enrolee]:
    """Every device to enrol, from the command line and the CSV; duplicates refused."""
    tags = tags_of(args.tags, "--tags")
    enrolees: list[Enrolee] = []
    if args.devices and not args.fleet:
        raise UsageError("--fleet: the devices on the command line need a fleet")
    for device in args.devices:
        enrolees.append(Enrolee(_name("DEVICE", "device", device),
                                _name("--fleet", "fleet", args.fleet), tags))  # fmt: skip
    if args.csv is not None:
        enrolees += read_csv(args.csv, args.fleet, tags)
    if not enrolees:
        raise UsageError("no device to enrol: name devices or give --csv FILE")
    seen: set[str] = set()
    for e in enrolees:
        if e.device in seen:
            where = f"--csv {args.csv}" if args.csv else "the command line"
            raise UsageError(f"device {e.device!r} is given twice ({where})")
        seen.add(e.device)
    return enrolees


def _mqtt_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise UsageError(
            f"--mqtt-url: {url!r} is not a broker URL like mqtts://broker.example.com:8883"
        )
    return url


def _read(option: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{option}: {path}: {e.strerror or e}") from None


def _trusted_keys(paths: Sequence[Path]) -> list[tuple[str, bytes]]:
    """(file name, PEM) of each public key; a private key never leaves the publisher."""
    keys: list[tuple[str, bytes]] = []
    for path in paths:
        data = _read("--trusted-key", path)
        if b"PRIVATE KEY" in data:
            raise UsageError(
                f"--trusted-key: {path} is a private key: give the publisher's public key"
                " (publisher.pub); the private key never goes to a device"
            )
        load_public_key(path)  # an ed25519 public key, or KeyFileError naming the file
        if not is_name(path.name) or path.name in (CA_FILE, "agent.toml", PASSWORD_FILE):
            raise UsageError(f"--trusted-key: {path.name!r} cannot be a file name in the bundle")
        if any(name == path.name for name, _ in keys):
            raise UsageError(f"--trusted-key: two keys named {path.name!r}: rename one")
        keys.append((path.name, data))
    return keys


def _ca(path: Path | None) -> bytes | None:
    if path is None:
        return None
    data = _read("--ca", path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise UsageError(f"--ca: {path} is not a PEM certificate")
    return data


def _session(args: argparse.Namespace) -> Session | None:
    """A session on the operator listener when one is named, for the enrolment records."""
    # --broker may be repeated (the nodes of a cluster): they share one scheme.
    urls = args.broker or [u for u in os.environ.get("EDGE_BROKER", "").split(",") if u.strip()]
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        return None
    url = urls[0].strip()
    ns, env = argparse.Namespace(**vars(args)), dict(os.environ)
    if urlsplit(url).scheme != "mqtts":
        # --ca is the devices' CA then: the plain (loopback) operator listener needs none.
        ns.ca = None
        env.pop("EDGE_CA", None)
    return Session(broker_options(ns, env), "enroll")


def enroll(args: argparse.Namespace) -> int:
    enrolees = plan(args)
    mqtt_url = _mqtt_url(args.mqtt_url)
    keys = _trusted_keys(args.trusted_key)
    ca_path = args.ca or os.environ.get("EDGE_CA")  # a string: the broker options' --ca
    ca = _ca(Path(ca_path) if ca_path else None)
    conf = BrokerConf(args.conf_dir)
    prefix = args.topic_prefix or os.environ.get("EDGE_TOPIC_PREFIX")
    if prefix and prefix != conf.prefix:
        raise UsageError(f"--topic-prefix: {prefix!r}, but {conf.acl} is for {conf.prefix!r}")
    accounts = [role_account("device", e.device, conf.prefix, e.fleet) for e in enrolees]
    conf.conflicts(accounts)
    existing = sorted(e.device for e in enrolees if e.device in conf.names(DEVICES))
    if existing and not args.renew:
        raise AccountError(
            f"{', '.join(existing)}: enrolled already; --renew gives a new password (the "
            "device is then cut off until its new bundle is installed)"
        )
    # The broker before any file: an unreachable one fails the command, not half of it.
    session = _session(args)
    try:
        args.output.mkdir(parents=True, exist_ok=True, mode=0o700)
        passwords = conf.write(accounts)
        done = []
        for e in enrolees:
            setup = DeviceSetup(e.device, e.fleet, mqtt_url, passwords[e.device], e.tags,
                                ca, keys, conf.prefix)  # fmt: skip
            done.append({"device": e.device, "fleet": e.fleet, "tags": e.tags,
                         "bundle": str(write_bundle(setup, args.output))})  # fmt: skip
        if session is not None:
            t = Topics(conf.prefix)  # the prefix the broker's ACL was rendered with
            mids = [
                session.publish(t.enrolment(e.device),
                                payloads.encode(payloads.enrolment(e.device, e.fleet, e.tags)))
                for e in enrolees
            ]  # fmt: skip
            session.wait(mids, "enrolment records")
    finally:
        if session is not None:
            session.close()
    _report(done, published=session is not None, as_json=args.json)
    return 0


def _report(done: list[dict[str, Any]], *, published: bool, as_json: bool) -> None:
    for entry in done:
        entry["enrolment"] = "published" if published else "not published (no --broker)"
    if as_json:
        print_json({"enrolled": done})
    else:
        rows = [[d["device"], d["fleet"], ",".join(f"{k}={v}" for k, v in d["tags"].items()),
                 d["bundle"]] for d in done]  # fmt: skip
        print(render_table(["DEVICE", "FLEET", "TAGS", "BUNDLE"], rows, max_width=width()))
    print(
        f"{len(done)} device(s) enrolled. Reload the broker so the accounts take effect:"
        " systemctl reload mosquitto (or kill -HUP its pid)",
        file=sys.stderr,
    )


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "enroll",
        help="make devices' broker accounts and ACL entries, and a bundle for each",
        description="Run on the broker's host: writes the broker's accounts and ACL "
        "(--conf-dir) and one DEVICE.tar.gz per device into -o DIR, for "
        "scripts/install-pi.sh --bundle. --ca (the broker's CA certificate) goes into "
        "every bundle as ca.crt. With --broker, also publishes each device's enrolment "
        "record.",
    )
    p.add_argument("devices", nargs="*", metavar="DEVICE", help="device ids (also the usernames)")
    p.add_argument("--fleet", help="the devices' fleet (the default of the CSV's fleet column)")
    p.add_argument("--tags", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="tags of every device (also key=v,key2=v2)")  # fmt: skip
    p.add_argument("--csv", type=Path, metavar="FILE",
                   help="more devices: columns device,fleet,tags (tags as k=v;k=v)")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="where the bundles go (DEVICE.tar.gz, mode 0600: it holds the password)")  # fmt: skip
    p.add_argument("--mqtt-url", required=True, metavar="URL",
                   help="the device listener as devices reach it, e.g. mqtts://broker:8883")  # fmt: skip
    p.add_argument("--trusted-key", type=Path, action="append", required=True, metavar="PUB",
                   help="the publisher's public key the devices trust (repeatable)")  # fmt: skip
    p.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR, metavar="DIR",
                   help=f"the broker's configuration folder (default {DEFAULT_CONF_DIR})")  # fmt: skip
    p.add_argument("--renew", action="store_true",
                   help="new passwords for devices enrolled already")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print what was enrolled as JSON")
    add_broker_arguments(p)
    p.set_defaults(func=enroll)
    return p
