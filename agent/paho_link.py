"""The device's MQTT connection: paho-mqtt 2, MQTT 5 or 3.1.1, one client for every component.

A named thread (``agent.loops.Loop``) connects and runs paho's network loop; when a
connection ends it asks ``agent/link_failover.py`` for the next URL of ``mqtt.urls``,
the MQTT version to speak there and the jittered wait, so an absent broker never delays
start-up or serving. paho's own reconnect is off: it knows a single host and a fixed
backoff. The retained status is ``online`` from each connect and ``offline`` as the
last will, set before each connection. Subscriptions registered with ``subscribe`` are
renewed in ``on_connect``, so a reconnect (clean start) or a move restores them; one
the broker refuses (SUBACK 0x80: NATS while it elects a JetStream leader) is asked for
again about a second later until granted. The device also reads its own status: a late
will of an earlier connection (NATS publishes the will of a dead or taken-over session
late, possibly through another node) is answered with ``online`` again.

``publish`` returns a ``PublishHandle`` that completes on the PUBACK, with its reason
under MQTT 5 (mosquitto answers an ACL denial with 135; MQTT 3.1.1 has no reason, the
broker drops it silently). A payload over the broker's Maximum Packet Size (MQTT 5
only) is refused before paho would resend it after every reconnect while the broker
cuts the connection each time. Under 3.1.1 an answer's correlation data is not sent
(the commands put it in the answer's body).

A connection that cannot be made is logged once per cause and URL, with the config key
to fix (``agent/link_diagnosis.py``); ``last_error`` keeps it for /status.

Every callback catches and logs its exceptions: one escaping would end the network
thread's loop step and with it the connection.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import link_diagnosis as diagnosis
from agent.config import Config
from agent.link import Handler, PublishHandle, Refusals
from agent.link_failover import V5, Endpoint, Failover
from agent.link_status import DeviceStatus
from agent.link_subscriptions import Subscriptions
from agent.loops import Loop
from agent.metrics import LinkMetrics, Metrics
from agent.secrets import read_secret, resolve_secret_path
from agent.wire.topics import Topics

log = logging.getLogger(__name__)

# Room for the fixed header, topic and properties of a PUBLISH next to its payload.
_HEADER_ROOM = 1024


class MqttClient:
    """The agent's one MQTT connection; other components publish and subscribe through it."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = cfg.device.id
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.failover = Failover(cfg.mqtt)
        self.tls = self.failover.current.tls  # one scheme for every URL (config checks it)

        self._lock = threading.Lock()
        self._pending: dict[int, PublishHandle] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._ever_connected = False
        self._max_packet: int | None = None
        self._started = False
        self._stopping = False
        self.reconnects = 0
        # What the running attempt came to, set by paho's callbacks on the network thread.
        self._attempt_connected = False
        self._attempt_refused: ReasonCode | None = None
        self.loop: Loop | None = None

        # reconnect_on_failure=False: the network thread below reconnects, to the next
        # URL; paho would also retry a 3.1.1 broker's "unacceptable version" with 3.1.
        # Made as 3.1.1 so paho sets up clean_session (always clean, as MQTT 5's clean
        # start); _connect() picks the version for each connection.
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.mqtt.client_id or self.device,
            protocol=paho.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        self._client.suppress_exceptions = True
        # Result batches in flight plus room for status, health and events.
        self._client.max_inflight_messages_set(cfg.mqtt.max_inflight + 10)
        # Bounded while offline: a QoS 1 publish beyond this fails instead of growing memory.
        self._client.max_queued_messages_set(cfg.mqtt.max_inflight + 1000)
        if cfg.mqtt.username:
            password = read_secret(cfg.mqtt.password_file) if cfg.mqtt.password_file else None
            self._client.username_pw_set(cfg.mqtt.username, password)
        if self.tls or cfg.mqtt.ca:
            # load_config has resolved them already; this covers a Config built in code.
            self._client.tls_set(
                ca_certs=_file(cfg.mqtt.ca),  # None: the system's trust store
                certfile=_file(cfg.mqtt.cert),
                keyfile=_file(cfg.mqtt.key),
            )
        # When the broker last sent anything (a PINGRESP included): on a silent network
        # cut the socket stays open and "connected" holds until the keepalive runs out,
        # so /status shows this too. paho has no hook for it: every incoming packet goes
        # through Client._packet_handle, which this wraps (a test keeps us honest).
        self._last_in: float | None = None
        handle_packet = self._client._packet_handle

        def counted_packet() -> Any:
            self._last_in = time.monotonic()
            return handle_packet()

        self._client._packet_handle = counted_packet  # type: ignore[method-assign]
        self._client.on_connect = self._on_connect
        self._client.on_log = self._on_log
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

        self._m = LinkMetrics(metrics.registry) if metrics is not None else None
        self.refusals = Refusals(self._m)
        # The retained status; its own topic is subscribed like any other filter (so
        # renewed and retried), to answer a late will.
        self.status = DeviceStatus(cfg, self.publish, lambda: self.connected, status)
        self.subscriptions = Subscriptions(self._client, self._m, own=self.status.topic)
        self._client.on_subscribe = self.subscriptions.on_subscribe

    # --- where we are ------------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        """The broker URL connected to, or tried next."""
        return self.failover.current

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def trouble(self) -> diagnosis.Trouble:
        return self.endpoint.trouble

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def protocol(self) -> str:
        """The MQTT version of the current (or next) connection: "5" or "3.1.1"."""
        return self.endpoint.speaks

    def report(self) -> dict[str, Any]:
        """The link's part of /status: where it is, which version, how often it moved."""
        return {
            "url": self.url,
            "urls": self.failover.urls,
            "protocol": self.protocol,
            "moves": self.failover.moves,
            "reconnects": self.reconnects,
            "subscribe_retries": self.subscribe_retries,
            "status_reasserts": self.status_reasserts,
        }

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; returns at once, broker or not."""
        self.subscribe(self.status.topic, 1, self.status.seen)
        ep = self.endpoint
        log.info("mqtt: connecting to %s as %s (%s)", ", ".join(self.failover.urls),
                 self.device, f"MQTT {ep.protocol}" if not ep.learn else "MQTT 5 or 3.1.1")  # fmt: skip
        # A connection lasts hours: _session() beats while paho's loop runs.
        self.loop = Loop("mqtt", self._session, stall_s=60.0)
        self._started = True
        self.loop.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Announce ``offline`` (retained) if connected, then disconnect without the will."""
        if not self._started or self.loop is None:
            return
        self._stopping = True
        self.status.leave()  # from here our own offline is not answered
        if self.connected:
            self.publish_status("offline", reason="stopped").wait(timeout)
        self.status.cancel()
        self._client.disconnect()  # also wakes paho's select, so the session ends now
        self.loop.stop(timeout)
        self._client._thread = None
        self._started = False
        self._stopping = False
        self.status.leave(False)
        self._set_connected(False)
        with self._lock:
            pending, self._pending = self._pending, {}
        for handle in pending.values():
            handle._complete(-1, "stopped before the broker acknowledged")
        log.info("mqtt: stopped")

    def alive(self) -> bool:
        """The network thread runs and has made progress within a minute."""
        return self._started and self.loop is not None and self.loop.alive()

    # --- the network thread: one connection per step --------------------------------

    def _session(self) -> float:
        """Connect to the current URL and run paho's loop until the connection ends;
        return the wait before the next attempt (where: ``self.failover``)."""
        assert self.loop is not None
        # paho's threaded mode with our thread: other threads' publish() only queue the
        # packet and wake the select, this thread writes (paho writes without a lock).
        self._client._thread = threading.current_thread()
        ep = self.endpoint
        self._attempt_connected, self._attempt_refused = False, None
        if not self._connect(ep):
            return self._after(self.failover.failed)
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        stop_by: float | None = None
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.loop.beat()
            rc = self._client.loop(1.0)
            if self.loop.stopping:
                # stop() sent DISCONNECT; this covers a connect made just after it.
                if stop_by is None:
                    stop_by = time.monotonic() + 2.0
                    self._client.disconnect()
                elif time.monotonic() > stop_by:
                    break
        if self.loop.stopping:
            return 0.0
        if self._attempt_connected:
            return self._after(self.failover.lost)
        refused = self._attempt_refused
        if refused is not None and diagnosis.unsupported(refused):
            return self._after(self.failover.unsupported)
        if refused is not None:
            return self._after(self.failover.failed)
        return self._after(self.failover.dropped)

    def _connect(self, ep: Endpoint) -> bool:
        """Open the TCP (and TLS) connection and send CONNECT; False when that failed."""
        # Set before every connection so its "since" and models are today's.
        self._client.will_set(self.status.topic, self.status.will(), qos=1, retain=True)
        # paho fixes the version when the Client is made; it switches itself (to 3.1 on
        # a refused 3.1.1 CONNECT) by setting this attribute, and so do we, per URL:
        # queued messages and subscriptions stay with the one client.
        self._client._protocol = paho.MQTTv5 if ep.speaks == V5 else paho.MQTTv311
        ep.trouble.attempt()
        try:
            self._client.connect(ep.host, ep.port, keepalive=self.cfg.mqtt.keepalive)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            ep.trouble.connect_failed(e)
            return False
        return True

    def _after(self, outcome: Callable[[], float]) -> float:
        """Tell the failover what the attempt came to; count a move; the wait."""
        moves = self.failover.moves
        wait = outcome()
        if self._m is not None and self.failover.moves > moves:
            self._m.moves.inc(self.failover.moves - moves)
        return wait

    def silent_s(self) -> float | None:
        """Seconds since the last packet from the broker; None before the first."""
        last = self._last_in
        return None if last is None else round(time.monotonic() - last, 1)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def add_connection_listener(self, fn: Callable[[bool], None]) -> None:
        """``fn(connected)`` on every connect and disconnect (runs on paho's thread)."""
        self._listeners.append(fn)

    @property
    def max_payload(self) -> int | None:
        """The largest payload the broker takes (from CONNACK), None until known."""
        return None if self._max_packet is None else self._max_packet - _HEADER_ROOM

    def status_payload(self, state: str, reason: str | None = None) -> dict[str, Any]:
        return self.status.payload(state, reason)

    def publish_status(self, state: str = "online", reason: str | None = None) -> PublishHandle:
        """Refresh the retained status (call when models change); only while connected."""
        return self.status.publish(state, reason)

    @property
    def status_reasserts(self) -> int:
        return self.status.reasserts

    # --- publish ---------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any],
        qos: int = 1,
        retain: bool = False,
        *,
        correlation_data: bytes | None = None,
    ) -> PublishHandle:
        """Publish; the handle completes on the broker's answer (never raises for that).

        ``correlation_data`` answers an MQTT 5 request (the device commands).
        """
        # MQTT 3.1.1 has no properties: the commands answer with the correlation in the body.
        v5 = self._client._protocol == paho.MQTTv5
        properties = None
        if correlation_data is not None and v5:
            properties = _response_properties(correlation_data)
        data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
        raw = data.encode() if isinstance(data, str) else data
        handle = PublishHandle(topic)
        limit = self.max_payload
        if limit is not None and len(raw) > limit:
            self.refusals.fail(handle, "too_large", f"payload of {len(raw)} bytes is over the broker's"
                       f" maximum of {limit} bytes")  # fmt: skip
            return handle
        if qos == 0:
            info = self._client.publish(topic, raw, qos=0, retain=retain, properties=properties)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                handle._complete(0)
            else:
                self.refusals.fail(handle, "not_sent", paho.error_string(info.rc))
            return handle
        # Hold paho's outgoing-message lock across publish() and our bookkeeping: its
        # network thread holds the same lock while it runs on_publish, so a PUBACK can
        # never arrive for a mid we have not recorded yet. Same lock order everywhere.
        with self._client._out_message_mutex:
            info = self._client.publish(topic, raw, qos=qos, retain=retain, properties=properties)
            handle.mid = info.mid
            # NO_CONN: paho keeps the message and sends it after the next connect.
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                with self._lock:
                    self._pending[info.mid] = handle
                return handle
        self.refusals.fail(handle, "not_sent", paho.error_string(info.rc))
        return handle

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        try:
            with self._lock:
                handle = self._pending.pop(mid, None)
            if handle is None:
                return  # QoS 0, or a publish from before stop()
            code = int(rc.value)
            if code >= 128:
                reason = rc.getName().lower().replace(" ", "_")
                self.refusals.fail(handle, reason, f"{rc.getName()} (reason {code})", code)
            else:
                handle._complete(code)
        except Exception:
            log.exception("mqtt: on_publish failed")

    # --- subscribe -------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int, handler: Handler) -> None:
        """Receive ``topic`` (a filter) now and after every reconnect; ``handler(Message)``."""
        self.subscriptions.add(topic, qos, handler)

    def unsubscribe(self, topic: str) -> None:
        self.subscriptions.remove(topic)

    @property
    def subscriptions_granted(self) -> int:
        return self.subscriptions.granted

    @property
    def subscribe_retries(self) -> int:
        return self.subscriptions.retries

    # --- connection events -----------------------------------------------------------

    @property
    def failures(self) -> dict[str, int]:
        """Publishes refused or not sent, by reason."""
        return self.refusals.counts

    @property
    def last_error(self) -> str | None:
        """Why the link is down, naming the key to fix; None while connected."""
        return self.trouble.last_error

    @property
    def failed_attempts(self) -> int:
        """Connection attempts failed since the last connect, over every URL."""
        return self.failover.failures

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        # Runs for every paho log line, sometimes under paho's locks: only remember.
        if level == paho.MQTT_LOG_ERR:
            self.trouble.socket_log(buf)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        try:
            if rc.is_failure:
                self._attempt_refused = rc
                # auto: "not MQTT 5" is what we asked, not a failure (link_failover logs it).
                if self.endpoint.may_learn and diagnosis.unsupported(rc):
                    self.trouble.answered()
                else:
                    self.trouble.refused(rc)
                return
            self._attempt_connected = True
            self.failover.connected()
            self.trouble.connected()
            # MQTT 5 only; a 3.1.1 CONNACK has no properties (paho hands an empty set).
            self._max_packet = getattr(props, "MaximumPacketSize", None)
            if self._ever_connected:
                self.reconnects += 1
                if self._m is not None:
                    self._m.reconnects.inc()
            self._ever_connected = True
            self._set_connected(True)
            # online before the subscriptions: the own-status watch then finds it retained
            # instead of the will of the last connection.
            self.publish_status("online")
            self.subscriptions.renew()
            log.info("mqtt: connected to %s (MQTT %s)", self.url, self.protocol)
        except Exception:
            log.exception("mqtt: on_connect failed")

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        try:
            was = self.connected
            self.subscriptions.down()
            self._set_connected(False)
            if self._stopping:
                return
            if was:
                self.trouble.lost(rc.getName())
                log.warning("mqtt: disconnected from %s (%s); reconnecting", self.url, rc.getName())
            else:
                self.trouble.closed_before_connack(rc.getName())
        except Exception:
            log.exception("mqtt: on_disconnect failed")

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        if self._m is not None:
            self._m.connected.set(1 if up else 0)
        for fn in list(self._listeners):
            try:
                fn(up)
            except Exception:
                log.exception("mqtt: connection listener failed")


def _file(value: str) -> str | None:
    return str(resolve_secret_path(value)) if value else None


def _response_properties(correlation_data: bytes) -> Properties:
    """PUBLISH properties for an answer to a request carrying ``correlation_data``."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation_data
    return props
