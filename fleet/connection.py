"""The broker options every ``edge-fleet`` command takes, and a connected paho client.

Options come from the command line first, then from ``EDGE_*`` environment variables,
so an operator can export the broker once per shell. The client speaks MQTT 5 (a
denied publish comes back as a reason code instead of vanishing) with paho's
VERSION2 callbacks; its subscriptions are made inside ``on_connect`` so a reconnect
renews them.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from agent.wire.errors import BrokerUnavailable, UsageError
from agent.wire.topics import DEFAULT_PREFIX, Topics
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

# The operator listener of broker-config/ (devices have 1883/8883 to themselves).
DEFAULT_BROKER = "mqtt://localhost:1884"
_PORTS = {"mqtt": 1883, "mqtts": 8883}
# option dest -> (flag, environment variable)
_ENV = {
    "broker": ("--broker", "EDGE_BROKER"),
    "username": ("--username", "EDGE_USERNAME"),
    "password_file": ("--password-file", "EDGE_PASSWORD_FILE"),
    "ca": ("--ca", "EDGE_CA"),
    "cert": ("--cert", "EDGE_CERT"),
    "key": ("--key", "EDGE_KEY"),
    "topic_prefix": ("--topic-prefix", "EDGE_TOPIC_PREFIX"),
}

MessageHandler = Callable[[mqtt.MQTTMessage], None]
SessionHandler = Callable[[mqtt.Client, bool], None]


@dataclass(frozen=True)
class BrokerOptions:
    url: str
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    topic_prefix: str = DEFAULT_PREFIX

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--broker``, ``--username``, ``--password-file``, ``--ca``, ``--cert``, ``--key``, ``--topic-prefix``."""
    group = parser.add_argument_group("broker (each also from its environment variable)")
    group.add_argument(
        "--broker",
        metavar="URL",
        help=f"mqtt://host:port or mqtts://host:port [$EDGE_BROKER, default {DEFAULT_BROKER}]",
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

    url, url_from = pick("broker")
    url = url or DEFAULT_BROKER
    parts = urlsplit(url)
    if parts.scheme not in _PORTS or not parts.hostname:
        raise UsageError(
            f"{url_from}: {url!r} is not a broker URL like mqtt://host:1883 or mqtts://host:8883"
        )
    try:
        port = parts.port or _PORTS[parts.scheme]
    except ValueError as e:
        raise UsageError(f"{url_from}: {url!r}: {e}") from None
    tls = parts.scheme == "mqtts"

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
        host=parts.hostname,
        port=port,
        tls=tls,
        username=username,
        password=password,
        ca=files["ca"],
        cert=files["cert"],
        key=files["key"],
        topic_prefix=prefix,
    )


def connect(
    options: BrokerOptions,
    *,
    purpose: str,
    subscriptions: Sequence[tuple[str, int]] = (),
    on_message: MessageHandler | None = None,
    timeout: float = 10.0,
    client_id: str | None = None,
    session_expiry_s: int | None = None,
    receive_maximum: int | None = None,
    manual_ack: bool = False,
    on_session: SessionHandler | None = None,
) -> mqtt.Client:
    """Connect, wait for the broker's CONNACK and return the running client.

    ``subscriptions`` are (re)made on every connect. Raises ``BrokerUnavailable`` with
    one line naming the broker when it cannot be reached, the TLS handshake fails or
    the broker refuses the credentials. Call ``disconnect`` when done.

    A long-running consumer (the collector) passes a stable ``client_id`` and
    ``session_expiry_s``: the session (subscriptions, unacknowledged and queued QoS 1
    messages) then outlives the connection. ``manual_ack``: paho sends no PUBACK by
    itself, the caller sends it with ``client.ack(mid, qos)``. ``on_session(client,
    session_present)`` runs on the network thread at every CONNACK, before the
    subscriptions are renewed and before the first message of the connection.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"edge-fleet-{purpose}-{secrets.token_hex(4)}",
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    # Our callbacks catch their own exceptions, but a bug must not end the network thread.
    client.suppress_exceptions = True
    client.connect_timeout = timeout
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    if options.username:
        client.username_pw_set(options.username, options.password)
    if options.tls:
        context = ssl.create_default_context(cafile=str(options.ca) if options.ca else None)
        if options.cert and options.key:
            try:
                context.load_cert_chain(str(options.cert), str(options.key))
            except (ssl.SSLError, OSError) as e:
                raise UsageError(f"--cert/--key: {options.cert}, {options.key}: {e}") from None
        client.tls_set_context(context)

    connected = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        try:
            if reason.is_failure:
                outcome.setdefault("refused", str(reason))
                connected.set()
                return
            if on_session is not None:
                on_session(c, bool(flags.session_present))
            if subscriptions:
                c.subscribe([(topic, qos) for topic, qos in subscriptions])
            log.info("connected to %s", options.url)
            outcome["ok"] = True
            connected.set()
        except Exception:
            log.exception("on_connect failed")

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        # A failure reason code: the broker went away, not our own disconnect().
        if outcome.get("ok") and reason.is_failure:
            log.warning("disconnected from %s: %s (reconnecting)", options.url, reason)

    def on_subscribe(_c: mqtt.Client, _u: object, _m: int, reasons: list[Any], _p: object) -> None:
        for (topic, _qos), reason in zip(subscriptions, reasons, strict=False):
            if reason.is_failure:
                log.error("subscription to %s refused: %s", topic, reason)

    def handle(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if on_message is None:
            return
        try:
            on_message(message)
        except Exception:
            log.exception("message on %s could not be handled", message.topic)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_message = handle

    where = f"broker {options.url}"
    try:
        if session_expiry_s is None and receive_maximum is None:
            client.connect(options.host, options.port, keepalive=30, clean_start=True)
        else:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if session_expiry_s is not None:
                props.SessionExpiryInterval = session_expiry_s
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
            # clean_start=False resumes the session on every reconnect (paho keeps it).
            client.connect(
                options.host,
                options.port,
                keepalive=30,
                clean_start=session_expiry_s is None,
                properties=props,
            )
    except ssl.SSLError as e:
        raise BrokerUnavailable(f"{where}: TLS handshake failed: {e.reason or e}") from None
    except OSError as e:
        raise BrokerUnavailable(f"{where}: cannot connect: {e.strerror or e}") from None
    client.loop_start()
    if not connected.wait(timeout):
        disconnect(client)
        raise BrokerUnavailable(f"{where}: no answer to CONNECT within {timeout:g} s")
    if "refused" in outcome:
        disconnect(client)
        who = f"user {options.username!r}" if options.username else "no username"
        raise BrokerUnavailable(f"{where}: connection refused ({who}): {outcome['refused']}")
    return client


def disconnect(client: mqtt.Client) -> None:
    """Disconnect cleanly and stop the network thread."""
    try:
        client.disconnect()
    finally:
        client.loop_stop()
