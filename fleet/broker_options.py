"""The broker options every ``edge-fleet`` command takes (fleet/connection.py connects).

Options come from the command line first, then from ``EDGE_*`` environment variables,
so an operator can export the broker once per shell. ``--broker`` may be repeated
(``EDGE_BROKER`` comma-separated): the nodes of one broker cluster, tried in order.
Every bad value is named with the flag (or variable) it came from.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent.wire.errors import UsageError
from agent.wire.topics import DEFAULT_PREFIX, Topics

# The operator listener of broker-config/ (devices have 1883/8883 to themselves).
DEFAULT_BROKER = "mqtt://localhost:1884"
PROTOCOLS = ("auto", "5", "3.1.1")
MAX_URLS = 16
_PORTS = {"mqtt": 1883, "mqtts": 8883}
# option dest -> (flag, environment variable)
_ENV = {
    "broker": ("--broker", "EDGE_BROKER"),
    "mqtt_protocol": ("--mqtt-protocol", "EDGE_MQTT_PROTOCOL"),
    "username": ("--username", "EDGE_USERNAME"),
    "password_file": ("--password-file", "EDGE_PASSWORD_FILE"),
    "ca": ("--ca", "EDGE_CA"),
    "cert": ("--cert", "EDGE_CERT"),
    "key": ("--key", "EDGE_KEY"),
    "topic_prefix": ("--topic-prefix", "EDGE_TOPIC_PREFIX"),
}


@dataclass(frozen=True)
class BrokerOptions:
    url: str  # the first of ``urls``; ``host`` and ``port`` are its own
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    topic_prefix: str = DEFAULT_PREFIX
    urls: tuple[str, ...] = ()  # every broker URL, in the order tried; () means (url,)
    protocol: str = "auto"  # "auto", "5" or "3.1.1"

    def __post_init__(self) -> None:
        if not self.urls:
            object.__setattr__(self, "urls", (self.url,))

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--broker`` (repeatable), ``--mqtt-protocol``, ``--username``,
    ``--password-file``, ``--ca``, ``--cert``, ``--key``, ``--topic-prefix``."""
    group = parser.add_argument_group("broker (each also from its environment variable)")
    group.add_argument(
        "--broker",
        metavar="URL",
        action="append",
        help="mqtt://host:port or mqtts://host:port; repeat it for the nodes of a cluster,"
        f" tried in order [$EDGE_BROKER, comma-separated, default {DEFAULT_BROKER}]",
    )
    group.add_argument(
        "--mqtt-protocol",
        metavar="VERSION",
        help="auto, 5 or 3.1.1; auto: MQTT 5, or 3.1.1 where the broker refuses 5"
        " [$EDGE_MQTT_PROTOCOL, default auto]",
    )
    group.add_argument("--username", metavar="NAME", help="broker account [$EDGE_USERNAME]")
    group.add_argument(
        "--password-file",
        metavar="PATH",
        help="file holding the account's password [$EDGE_PASSWORD_FILE]",
    )
    group.add_argument(
        "--ca", metavar="PATH", help="CA certificate for mqtts:// (default: system CAs) [$EDGE_CA]"
    )
    group.add_argument(
        "--cert", metavar="PATH", help="client certificate for mqtts:// [$EDGE_CERT]"
    )
    group.add_argument("--key", metavar="PATH", help="client certificate's key [$EDGE_KEY]")
    group.add_argument(
        "--topic-prefix",
        metavar="PREFIX",
        help=f"topic prefix [$EDGE_TOPIC_PREFIX, default {DEFAULT_PREFIX}]",
    )


def parse_url(url: str, source: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` -> (host, port, tls); ``source`` names the flag in errors."""
    parts = urlsplit(url)
    if parts.scheme not in _PORTS or not parts.hostname:
        raise UsageError(
            f"{source}: {url!r} is not a broker URL like mqtt://host:1883 or mqtts://host:8883"
        )
    try:
        port = parts.port or _PORTS[parts.scheme]
    except ValueError as e:
        raise UsageError(f"{source}: {url!r}: {e}") from None
    return parts.hostname, port, parts.scheme == "mqtts"


def _broker_urls(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[list[str], str]:
    """The URLs as given, and where they came from (for errors)."""
    given = getattr(args, "broker", None)
    if isinstance(given, str):  # a Namespace built in code
        given = [given]
    if given:
        return [str(u) for u in given], "--broker"
    if env.get("EDGE_BROKER"):
        value = env["EDGE_BROKER"]
        urls = [u.strip() for u in value.split(",")]
        if not all(urls):
            raise UsageError(f"$EDGE_BROKER: {value!r} has an empty entry (URLs comma-separated)")
        return urls, "$EDGE_BROKER"
    return [DEFAULT_BROKER], "--broker"


def broker_options(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> BrokerOptions:
    """Resolve the broker options: flag, else environment variable, else default."""
    env = os.environ if environ is None else environ

    def pick(dest: str) -> tuple[str | None, str]:
        flag, var = _ENV[dest]
        value = getattr(args, dest, None)
        if value:
            return str(value), flag
        if env.get(var):
            return env[var], f"${var}"
        return None, flag

    urls, url_from = _broker_urls(args, env)
    if len(urls) > MAX_URLS:
        raise UsageError(f"{url_from}: {len(urls)} broker URLs, at most {MAX_URLS}")
    parsed = [parse_url(u, url_from) for u in urls]
    for i, u in enumerate(urls):
        if u in urls[:i]:
            raise UsageError(f"{url_from}: {u!r} is given twice")
    url, (host, port, tls) = urls[0], parsed[0]
    for u, (_h, _p, other_tls) in zip(urls[1:], parsed[1:], strict=True):
        if other_tls != tls:
            raise UsageError(
                f"{url_from}: {url!r} and {u!r}: every URL must be mqtt:// or every one"
                " mqtts:// (one TLS setting for all)"
            )

    protocol, protocol_from = pick("mqtt_protocol")
    protocol = protocol or "auto"
    if protocol not in PROTOCOLS:
        raise UsageError(f"{protocol_from}: {protocol!r} is not one of {', '.join(PROTOCOLS)}")

    files: dict[str, Path | None] = {}
    for dest in ("password_file", "ca", "cert", "key"):
        value, source = pick(dest)
        if value is None:
            files[dest] = None
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"{source}: {value}: no such file")
        if dest != "password_file" and not tls:
            raise UsageError(f"{source}: {value}: given, but {url_from} {url!r} is not mqtts://")
        files[dest] = path
    if (files["cert"] is None) != (files["key"] is None):
        raise UsageError("--cert and --key: give both or neither")

    username, _ = pick("username")
    password = None
    if files["password_file"] is not None:
        if not username:
            raise UsageError("--password-file: given without --username ($EDGE_USERNAME)")
        password = files["password_file"].read_text(encoding="utf-8").rstrip("\r\n")

    prefix, prefix_from = pick("topic_prefix")
    prefix = prefix or DEFAULT_PREFIX
    if any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
        raise UsageError(f"{prefix_from}: {prefix!r} must be topic levels without wildcards")

    return BrokerOptions(
        url=url,
        host=host,
        port=port,
        tls=tls,
        username=username,
        password=password,
        ca=files["ca"],
        cert=files["cert"],
        key=files["key"],
        topic_prefix=prefix,
        urls=tuple(urls),
        protocol=protocol,
    )
