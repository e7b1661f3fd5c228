"""The device's MQTT connection: paho-mqtt 2, MQTT 5, one client for every component.

``connect_async`` + ``loop_start``: an absent broker never delays start-up or serving;
paho reconnects with backoff (``mqtt.reconnect_min_s`` .. ``mqtt.reconnect_max_s``). The
retained status is ``online`` from each connect and ``offline`` as the last will.
Subscriptions registered with ``subscribe`` are renewed in ``on_connect``, so a
reconnect (clean start) restores them.

``publish`` returns a ``PublishHandle`` that completes on the PUBACK, with its reason
under MQTT 5 (mosquitto answers an ACL denial with 135, MQTT 3.1.1 drops it silently).
A payload over the broker's Maximum Packet Size is refused before paho would resend it
after every reconnect while the broker cuts the connection each time.

A connection that cannot be made is logged once per cause, with the config key to fix
(``agent/link_diagnosis.py``); ``last_error`` keeps it for /status.

Every callback catches and logs its exceptions: one escaping would end paho's network
thread and with it the connection.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import link_diagnosis as diagnosis
from agent.config import Config
from agent.link import Handler, PublishHandle, Refusals, dispatcher
from agent.metrics import LinkMetrics, Metrics
from agent.secrets import read_secret, resolve_secret_path
from agent.wire import payloads
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
        self._status = status  # -> the /status body; its "models" go in the retained status
        url = urlsplit(cfg.mqtt.url)
        self.tls = url.scheme == "mqtts"
        self.host = url.hostname or "localhost"
        self.port = url.port or (8883 if self.tls else 1883)

        self._lock = threading.Lock()
        self._pending: dict[int, PublishHandle] = {}
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._ever_connected = False
        self._max_packet: int | None = None
        self._started = False
        self._stopping = False
        self.reconnects = 0
        self.subscriptions_granted = 0  # SUBACKs that granted a filter, over all connects
        self.trouble = diagnosis.Trouble(cfg.mqtt, self.host, self.port, tls=self.tls)

        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.mqtt.client_id or self.device,
            protocol=paho.MQTTv5,
        )
        self._client.suppress_exceptions = True
        self._client.reconnect_delay_set(
            max(1, round(cfg.mqtt.reconnect_min_s)), max(1, round(cfg.mqtt.reconnect_max_s))
        )
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
        self._client.on_pre_connect = self._on_pre_connect
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
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_log = self._on_log
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

        self._m = LinkMetrics(metrics.registry) if metrics is not None else None
        self.refusals = Refusals(self._m)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; returns at once, broker or not."""
        self._set_will()
        log.info("mqtt: connecting to %s:%d as %s", self.host, self.port, self.device)
        self._client.connect_async(self.host, self.port, keepalive=self.cfg.mqtt.keepalive)
        self._client.loop_start()
        self._started = True

    def stop(self, timeout: float = 3.0) -> None:
        """Announce ``offline`` (retained) if connected, then disconnect without the will."""
        if not self._started:
            return
        if self.connected:
            self.publish_status("offline", reason="stopped").wait(timeout)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False
        self._stopping = False
        self._set_connected(False)
        with self._lock:
            pending, self._pending = self._pending, {}
        for handle in pending.values():
            handle._complete(-1, "stopped before the broker acknowledged")
        log.info("mqtt: stopped")

    def alive(self) -> bool:
        """paho's network thread is running (it reconnects by itself while it runs)."""
        thread = getattr(self._client, "_thread", None)
        return self._started and thread is not None and thread.is_alive()

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
        report = self._report()
        return payloads.status(
            self.device,
            self.cfg.device.fleet,
            state,
            dict(report.get("models", {})),
            reason=reason,
            tags=report.get("tags", self.cfg.device.tags),
            trusted_keys=report.get("trusted_keys"),
        )

    def _report(self) -> Mapping[str, Any]:
        """The /status body: its models, tags and trusted keys go in the retained status."""
        if self._status is None:
            return {}
        try:
            return self._status()
        except Exception:
            log.exception("mqtt: reading the models for the status failed")
            return {}

    def publish_status(self, state: str = "online", reason: str | None = None) -> PublishHandle:
        """Refresh the retained status (call when models change).

        Only while connected: a status queued offline could land after the fresh one
        ``on_connect`` sends, leaving a stale retained status behind.
        """
        if not self.connected:
            handle = PublishHandle(self.topics.status(self.device))
            handle._complete(-1, "not connected; the status is sent on connect")
            return handle
        payload = self.status_payload(state, reason)
        return self.publish(self.topics.status(self.device), payload, qos=1, retain=True)

    def _set_will(self) -> None:
        # Renewed before every connection so "since" and models are those of the last one.
        will = self.status_payload("offline", reason="connection lost")
        self._client.will_set(self.topics.status(self.device), json.dumps(will), qos=1, retain=True)

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
        properties = None if correlation_data is None else _response_properties(correlation_data)
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
        self._client.message_callback_add(topic, dispatcher(topic, handler))
        # on_connect lists the topics and marks the link up under the same lock: a topic
        # added meanwhile is in that list or subscribes here (twice is harmless).
        with self._lock:
            self._subs[topic] = (qos, handler)
            up = self.connected
        if up:
            self._client.subscribe(topic, qos=qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
        self._client.message_callback_remove(topic)
        if self.connected:
            self._client.unsubscribe(topic)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, rcs: list[ReasonCode], p: Any
    ) -> None:
        try:
            for rc in rcs:
                if rc.is_failure:
                    log.error("mqtt: subscription refused by the broker: %s", rc.getName())
                else:
                    self.subscriptions_granted += 1
        except Exception:
            log.exception("mqtt: on_subscribe failed")

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
        return self.trouble.failed_attempts

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self.trouble.attempt()

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        # Runs for every paho log line, sometimes under paho's locks: only remember.
        if level == paho.MQTT_LOG_ERR:
            self.trouble.socket_log(buf)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        try:
            # Called from paho's `except OSError:` around the TCP connect and TLS handshake.
            self.trouble.connect_failed(sys.exc_info()[1])
        except Exception:
            log.exception("mqtt: on_connect_fail failed")

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        try:
            if rc.is_failure:
                self.trouble.refused(rc)
                return
            self.trouble.connected()
            self._max_packet = getattr(props, "MaximumPacketSize", None)
            if self._ever_connected:
                self.reconnects += 1
                if self._m is not None:
                    self._m.reconnects.inc()
            self._ever_connected = True
            with self._lock:
                subs = list(self._subs.items())
                self._connected.set()  # see subscribe()
            for topic, (qos, _) in subs:
                client.subscribe(topic, qos=qos)
            self._set_connected(True)
            self.publish_status("online")
            log.info("mqtt: connected to %s:%d", self.host, self.port)
        except Exception:
            log.exception("mqtt: on_connect failed")

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        try:
            was = self.connected
            self._set_connected(False)
            if self._stopping:
                return
            if was:
                self.trouble.lost(rc.getName())
                log.warning("mqtt: disconnected (%s); reconnecting", rc.getName())
            else:
                self.trouble.closed_before_connack(rc.getName())
            self._set_will()
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
