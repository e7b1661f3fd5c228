"""A connected paho client for every ``edge-fleet`` command, over one or several brokers.

``connect()`` tries the broker URLs (fleet/broker_options.py) in order, and a client
that stays connected moves to the next one when its connection is lost (``Rotation``:
round robin, full-jitter backoff after a whole round, the agent's rule). All of that
lives here, so no command handles a failover itself.

The client speaks MQTT 5 where the broker does (a denied publish comes back as a reason
code instead of vanishing), else MQTT 3.1.1 (``--mqtt-protocol``; NATS speaks only
3.1.1), with paho's VERSION2 callbacks. Its subscriptions are made inside ``on_connect``
so a reconnect renews them, and a refused SUBACK (NATS during a JetStream leader
election) is asked again.
"""

from __future__ import annotations

import logging
import random
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from agent.wire.errors import BrokerUnavailable, UsageError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# The options live in their own module; every command imports them from here.
from fleet.broker_options import (
    DEFAULT_BROKER,
    PROTOCOLS,
    BrokerOptions,
    add_broker_arguments,
    broker_options,
    parse_url,
)

__all__ = [
    "DEFAULT_BROKER",
    "PROTOCOLS",
    "BrokerOptions",
    "BrokerUnreachable",
    "FleetClient",
    "Rotation",
    "add_broker_arguments",
    "broker_options",
    "connect",
    "disconnect",
    "parse_url",
]

log = logging.getLogger(__name__)

RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
RESUBSCRIBE_S = 1.0  # a refused SUBACK is asked again after about this long
ATTEMPT_MIN_S = 2.0  # each URL's share of connect()'s timeout, at least
KEEPALIVE_S = 30
# CONNACK "unsupported protocol version": paho maps a 3.1.1 broker's return code 1,
# which is what NATS 2.9 answers to an MQTT 5 CONNECT, to this reason code.
UNSUPPORTED_PROTOCOL = 0x84

MessageHandler = Callable[[mqtt.MQTTMessage], None]
SessionHandler = Callable[["FleetClient", bool], None]
Subscription = tuple[str, int]


class BrokerUnreachable(BrokerUnavailable):
    """No broker URL answered: nothing listens, or no CONNACK in time. Waiting may fix
    it, unlike refused credentials or a failed TLS handshake."""


# --- which URL next ------------------------------------------------------------------


class Rotation:
    """The broker URLs in turn, the agent's rule (agent/link_failover.py): after a lost
    connection or a failed attempt the next one; each says how long to wait first.

    A lost connection, or a failed attempt within a round, waits uniform(0, min_s); after
    a whole round of failed attempts the wait is full jitter, uniform(0, min(max_s, min_s
    * 2**rounds)), so a cluster's clients do not come back in step.
    """

    def __init__(
        self,
        urls: Sequence[str],
        min_s: float = RECONNECT_MIN_S,
        max_s: float = RECONNECT_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        self.urls = tuple(urls)
        self.min_s, self.max_s = min_s, max_s
        self.rng = rng or random.Random()
        self.index = 0
        self.failures = 0  # attempts failed since the last connection

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def failed(self) -> float:
        """An attempt did not connect: the next URL, and the seconds to wait first."""
        self.failures += 1
        self.index = (self.index + 1) % len(self.urls)
        if self.failures % len(self.urls):
            return self.rng.uniform(0, self.min_s)
        rounds = min(self.failures // len(self.urls), 32)
        return self.rng.uniform(0, min(self.max_s, self.min_s * 2.0**rounds))

    def lost(self) -> float:
        """A connection that was up ended: the next URL, after a short wait."""
        self.index = (self.index + 1) % len(self.urls)
        return self.rng.uniform(0, self.min_s)

    def connected(self) -> None:
        self.failures = 0


# --- the client ------------------------------------------------------------------------


class FleetClient(mqtt.Client):
    """paho's client, knowing which broker URL it is on and which MQTT version it speaks."""

    url: str = ""  # the URL connected to (or being tried after a lost connection)
    mqtt5: bool = True
    moves: int = 0  # changes of URL after the first connection
    refused_subscriptions: int = 0  # SUBACKs refused, each asked again
    closing: bool = False  # disconnect() was called: no more moves

    @property
    def protocol_name(self) -> str:
        return "5" if self.mqtt5 else "3.1.1"


@dataclass(frozen=True)
class _Failed:
    kind: str  # "unreachable", "silent", "closed" (no CONNACK) or "unsupported" (0x84)
    text: str  # "broker URL: why", for the error


_said: set[str] = set()


def _once(key: str, message: str, *args: object) -> None:
    if key not in _said:
        _said.add(key)
        log.warning(message, *args)


class _Link:
    """One ``connect()``: how to build and connect a client, its paho callbacks, and the
    rotation through the URLs that outlives each connection."""

    def __init__(
        self,
        options: BrokerOptions,
        *,
        purpose: str,
        subscriptions: Sequence[Subscription] | Callable[[FleetClient], Sequence[Subscription]],
        on_message: MessageHandler | None,
        client_id: str | None,
        session_expiry_s: int | None,
        receive_maximum: int | None,
        manual_ack: bool,
        on_session: SessionHandler | None,
    ) -> None:
        self.options = options
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.client_id = client_id or f"edge-fleet-{purpose}-{secrets.token_hex(4)}"
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.manual_ack = manual_ack
        self.on_session = on_session
        self.rotation = Rotation(options.urls)
        self.endpoints = {u: parse_url(u, "--broker")[:2] for u in options.urls}
        self.settled = False  # a CONNACK accepted us: a lost connection moves on from now
        self.last_url: str | None = None  # where the last CONNACK came from
        self.up = False  # the current connection got its CONNACK
        self.outcome: dict[str, Any] = {}  # what the attempt under way saw
        self.answered = threading.Event()
        self.granted = threading.Event()  # a SUBACK granted what on_connect asked for
        self._lock = threading.Lock()
        self._requested: dict[int, list[Subscription]] = {}  # SUBSCRIBE mid -> filters

    # --- building and connecting -------------------------------------------------------

    def build(self, mqtt5: bool) -> FleetClient:
        if mqtt5:
            client = FleetClient(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=self.manual_ack,
            )
        else:
            if self.receive_maximum is not None:
                _once("receive-maximum", "MQTT 3.1.1 has no receive maximum: the broker's"
                      " own limit of unacknowledged messages applies")  # fmt: skip
            # A session expiry asks for a session that outlives the connection: under
            # 3.1.1 that is clean_session=False, kept as long as the broker keeps it.
            client = FleetClient(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=not self.session_expiry_s,
                manual_ack=self.manual_ack,
            )
        client.mqtt5 = mqtt5
        # Our callbacks catch their own exceptions, but a bug must not end the network thread.
        client.suppress_exceptions = True
        client.reconnect_delay_set(int(RECONNECT_MIN_S), int(RECONNECT_MAX_S))
        if self.options.username:
            client.username_pw_set(self.options.username, self.options.password)
        if self.options.tls:
            options = self.options
            context = ssl.create_default_context(cafile=str(options.ca) if options.ca else None)
            if options.cert and options.key:
                try:
                    context.load_cert_chain(str(options.cert), str(options.key))
                except (ssl.SSLError, OSError) as e:
                    raise UsageError(f"--cert/--key: {options.cert}, {options.key}: {e}") from None
            client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._handle
        return client

    def _connect_args(self, client: FleetClient) -> dict[str, Any]:
        """``connect``/``connect_async`` keywords for this client's MQTT version."""
        if not client.mqtt5:
            return {"keepalive": KEEPALIVE_S}
        if self.session_expiry_s is None and self.receive_maximum is None:
            return {"keepalive": KEEPALIVE_S, "clean_start": True}
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self.session_expiry_s is not None:
            props.SessionExpiryInterval = self.session_expiry_s
        if self.receive_maximum is not None:
            props.ReceiveMaximum = self.receive_maximum
        # clean_start=False resumes the session on every reconnect (paho keeps it).
        return {
            "keepalive": KEEPALIVE_S,
            "clean_start": self.session_expiry_s is None,
            "properties": props,
        }

    def attempt(self, url: str, mqtt5: bool, wait: float) -> FleetClient | _Failed:
        """One CONNECT to ``url``: the running client, or why not when waiting may help;
        ``BrokerUnavailable`` for what it cannot (credentials, TLS)."""
        host, port = self.endpoints[url]
        where = f"broker {url}"
        client = self.build(mqtt5)
        client.url = url
        # Also the TCP and TLS timeout of every later reconnect: not below 2 s.
        client.connect_timeout = max(wait, ATTEMPT_MIN_S)
        self.outcome = {}
        self.answered.clear()
        try:
            client.connect(host, port, **self._connect_args(client))
        except ssl.SSLError as e:
            raise BrokerUnavailable(f"{where}: TLS handshake failed: {e.reason or e}") from None
        except OSError as e:
            return _Failed("unreachable", f"{where}: cannot connect: {e.strerror or e}")
        client.loop_start()
        if not self.answered.wait(wait):
            disconnect(client)
            return _Failed("silent", f"{where}: no answer to CONNECT within {wait:g} s")
        if self.outcome.get("ok"):
            return client
        disconnect(client)
        reason = self.outcome.get("refused")
        if reason is None:
            return _Failed("closed", f"{where}: closed the connection without a CONNACK")
        if int(reason.value) == UNSUPPORTED_PROTOCOL:
            return _Failed("unsupported", f"{where}: {reason}")
        who = f"user {self.options.username!r}" if self.options.username else "no username"
        raise BrokerUnavailable(f"{where}: connection refused ({who}): {reason}")

    def open(self, timeout: float) -> FleetClient:
        """Try the URLs in order until one connects; with several, around again until
        ``timeout``. Under ``auto`` a URL that refuses MQTT 5 is asked with 3.1.1."""
        protocol = self.options.protocol
        urls = self.options.urls
        deadline = time.monotonic() + timeout
        share = timeout if len(urls) == 1 else max(ATTEMPT_MIN_S, timeout / len(urls))
        mqtt5 = protocol != "3.1.1"
        failures: dict[str, str] = {}
        while True:
            url = self.rotation.current
            wait = max(0.1, min(share, deadline - time.monotonic()))
            result = self.attempt(url, mqtt5, wait)
            fallback = isinstance(result, _Failed) and result.kind in ("unsupported", "closed")
            if fallback and mqtt5 and protocol == "auto":
                assert isinstance(result, _Failed)
                older = self.attempt(url, False, wait)
                if isinstance(older, FleetClient) or result.kind == "unsupported":
                    log.info("%s: no MQTT 5; using MQTT 3.1.1", result.text)
                    mqtt5, result = False, older
            if isinstance(result, FleetClient):
                return self._granted(result, timeout)
            if result.kind == "unsupported":
                raise BrokerUnavailable(
                    f"{result.text}: it does not speak MQTT 5 (--mqtt-protocol 5); use"
                    " --mqtt-protocol auto or 3.1.1"
                )
            failures[url] = result.text
            delay = self.rotation.failed()
            left = deadline - time.monotonic()
            if len(urls) == 1 or left <= 0:
                if len(urls) == 1:
                    raise BrokerUnreachable(result.text)
                raise BrokerUnreachable(
                    f"brokers {', '.join(urls)}: none connected within {timeout:g} s ("
                    + "; ".join(failures[u] for u in urls if u in failures)
                    + ")"
                )
            time.sleep(min(delay, left))

    def _granted(self, client: FleetClient, timeout: float) -> FleetClient:
        """Wait for the SUBACK: a command reading retained messages for ``--wait`` seconds
        must count from the subscription, and NATS takes seconds to grant one (it makes a
        JetStream consumer per filter)."""
        if not self.granted.wait(timeout):
            disconnect(client)
            raise BrokerUnreachable(
                f"broker {client.url}: subscriptions not granted within {timeout:g} s"
            )
        return client

    # --- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, c: mqtt.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        client = c if isinstance(c, FleetClient) else None
        try:
            if client is None:
                return
            if reason.is_failure:
                if self.settled:
                    log.warning("%s refused the connection: %s", client.url, reason)
                else:
                    self.outcome.setdefault("refused", reason)
                    self.answered.set()
                return
            self.settled = True  # from now on a lost connection moves to the next URL
            self.up = True
            self.rotation.connected()
            if self.last_url is not None and client.url != self.last_url:
                client.moves += 1
                log.warning("connected to %s (moved from %s)", client.url, self.last_url)
            else:
                log.info("connected to %s (MQTT %s)", client.url, client.protocol_name)
            self.last_url = client.url
            if self.on_session is not None:
                self.on_session(client, bool(flags.session_present))
            subs = self.subscriptions
            wanted = list(subs(client) if callable(subs) else subs)
            if wanted:
                self._subscribe(client, wanted)
            else:
                self.granted.set()
            self.outcome["ok"] = True
            self.answered.set()
        except Exception:
            log.exception("on_connect failed")

    def _on_disconnect(
        self, c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object
    ) -> None:
        try:
            if not isinstance(c, FleetClient):
                return
            if not self.settled:
                self.answered.set()  # closed before (or after a refusing) CONNACK
            elif reason.is_failure and not c.closing:
                was_up, self.up = self.up, False
                why = f"disconnected from {c.url}" if was_up else f"no connection to {c.url}"
                self._move(c, f"{why}: {reason}", lost=was_up)
        except Exception:
            log.exception("on_disconnect failed")

    def _on_connect_fail(self, c: mqtt.Client, _u: object) -> None:
        try:
            # paho calls this inside its `except OSError:` around the TCP connect and
            # the TLS handshake, so the exception is still at hand.
            if isinstance(c, FleetClient) and self.settled and not c.closing:
                error = sys.exc_info()[1]
                why = getattr(error, "strerror", None) or error or "failed"
                self._move(c, f"cannot connect to {c.url}: {why}")
        except Exception:
            log.exception("on_connect_fail failed")

    def _move(self, client: FleetClient, why: str, *, lost: bool = False) -> None:
        """The next URL, after the rotation's wait; paho's loop makes the attempt."""
        delay = self.rotation.lost() if lost else self.rotation.failed()
        url = self.rotation.current
        host, port = self.endpoints[url]
        # paho sleeps its reconnect delay with time.sleep: a float is fine whatever its
        # hint says. connect_async only records where to go; paho's loop reconnects.
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        client.connect_async(host, port, **self._connect_args(client))
        client.url = url
        log.warning("%s; trying %s in %.1f s", why, url, delay)

    def _subscribe(self, client: FleetClient, subs: list[Subscription]) -> None:
        if not subs:
            return
        with self._lock:
            _rc, mid = client.subscribe(subs)
            if mid is not None:
                self._requested[mid] = subs

    def _on_subscribe(
        self, c: mqtt.Client, _u: object, mid: int, reasons: list[Any], _p: object
    ) -> None:
        try:
            with self._lock:
                subs = self._requested.pop(mid, [])
            refused = [s for s, r in zip(subs, reasons, strict=False) if r.is_failure]
            if not refused:
                self.granted.set()
                return
            if not isinstance(c, FleetClient):
                return
            c.refused_subscriptions += 1
            for (topic, _qos), reason in zip(subs, reasons, strict=False):
                if reason.is_failure:
                    level = logging.ERROR if c.refused_subscriptions == 1 else logging.DEBUG
                    log.log(level, "subscription to %s refused: %s (asking again)", topic, reason)
            # NATS refuses while it cannot make the subscription's JetStream consumer
            # (a leader election after a node died); it grants a later SUBSCRIBE.
            timer = threading.Timer(
                RESUBSCRIBE_S * random.uniform(0.5, 1.5), self._resubscribe, (c, refused)
            )
            timer.daemon = True
            timer.start()
        except Exception:
            log.exception("on_subscribe failed")

    def _resubscribe(self, client: FleetClient, subs: list[Subscription]) -> None:
        if client.is_connected() and not client.closing:
            self._subscribe(client, subs)

    def _handle(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(message)
        except Exception:
            log.exception("message on %s could not be handled", message.topic)


def connect(
    options: BrokerOptions,
    *,
    purpose: str,
    subscriptions: Sequence[Subscription] | Callable[[FleetClient], Sequence[Subscription]] = (),
    on_message: MessageHandler | None = None,
    timeout: float = 10.0,
    client_id: str | None = None,
    session_expiry_s: int | None = None,
    receive_maximum: int | None = None,
    manual_ack: bool = False,
    on_session: SessionHandler | None = None,
) -> FleetClient:
    """Connect, wait for the broker's CONNACK and return the running client.

    The URLs are tried in order, one attempt each; with several, around again until
    ``timeout``; then the SUBACK of ``subscriptions`` is waited for (``timeout`` again). Once connected, a lost connection moves the client to the next URL
    (``Rotation``), whoever keeps it running. ``options.protocol`` "auto" speaks MQTT 5
    and falls back to 3.1.1 when the broker refuses 5 (``client.mqtt5`` says which);
    the version stays for the client's life.

    ``subscriptions`` are (re)made on every connect; a callable gets the client (its
    MQTT version) and returns them. Raises ``BrokerUnavailable`` with one line naming
    the broker when it refuses the credentials or the TLS handshake fails, and
    ``BrokerUnreachable`` when no URL answered. Call ``disconnect`` when done.

    A long-running consumer (the collector) passes a stable ``client_id`` and
    ``session_expiry_s``: the session (subscriptions, unacknowledged and queued QoS 1
    messages) then outlives the connection (clean_session=False under 3.1.1, which has
    no expiry and no ``receive_maximum``). ``manual_ack``: paho sends no PUBACK by
    itself, the caller sends it with ``client.ack(mid, qos)``. ``on_session(client,
    session_present)`` runs on the network thread at every CONNACK, before the
    subscriptions are renewed and before the first message of the connection.
    """
    link = _Link(
        options,
        purpose=purpose,
        subscriptions=subscriptions,
        on_message=on_message,
        client_id=client_id,
        session_expiry_s=session_expiry_s,
        receive_maximum=receive_maximum,
        manual_ack=manual_ack,
        on_session=on_session,
    )
    return link.open(timeout)


def disconnect(client: mqtt.Client) -> None:
    """Disconnect cleanly and stop the network thread."""
    if isinstance(client, FleetClient):
        client.closing = True
    try:
        client.disconnect()
    finally:
        client.loop_stop()
