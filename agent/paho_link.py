"""The device's MQTT connection: paho-mqtt 2, MQTT 5, one client for every component.

``connect_async`` + ``loop_start``: an absent broker never delays start-up or serving;
paho reconnects with backoff (``mqtt.reconnect_min_s`` .. ``mqtt.reconnect_max_s``). The
retained status is ``online`` from each connect and ``offline`` as the last will.
Subscriptions registered with ``subscribe`` are renewed in ``on_connect``, so a
reconnect (clean start) restores them.

``publish`` returns a ``PublishHandle`` that completes on the broker's PUBACK. MQTT 5
matters here: mosquitto answers a publish its ACL denies with reason 135 "not
authorized" (MQTT 3.1.1 drops it silently), and the handle carries that reason; every
failure is logged and counted. A payload over the broker's Maximum Packet Size is
refused before it reaches paho, which would otherwise resend it after every reconnect
while the broker cuts the connection each time.

A connection that cannot be made is logged once per cause, not on every retry: the
cause (the TLS error such as "certificate verify failed", the refused login, the
unreachable broker) and the config key to fix (``mqtt.ca``, ``mqtt.cert``/``mqtt.key``,
``mqtt.username``/``mqtt.password_file``, ``mqtt.url``). ``last_error`` keeps it for
/status until the next connect. paho hands a failed TLS handshake to ``on_connect_fail``
from inside its ``except OSError``, so ``sys.exc_info()`` there is the ssl error; a TLS
alert after the handshake (TLS 1.3: the broker refusing our client certificate) only
reaches ``on_log`` ("failed to receive on socket: ...") before ``on_disconnect``.

Every callback catches and logs its exceptions: one escaping would end paho's network
thread and with it the connection.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
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
from prometheus_client import Counter, Gauge

from agent.config import Config, read_secret, resolve_secret_path
from agent.link import Handler, Message, PublishHandle
from agent.metrics import Metrics
from agent.wire import payloads
from agent.wire.topics import Topics

log = logging.getLogger(__name__)

# Room for the fixed header, topic and properties of a PUBLISH next to its payload.
_HEADER_ROOM = 1024
_FAILURE_LOG_INTERVAL_S = 30.0
# X509_V_ERR_HOSTNAME_MISMATCH: the certificate verified, but not for the host in the URL.
_HOSTNAME_MISMATCH = 62
# paho's on_log text for a socket error; a TLS alert from the broker arrives this way.
_SOCKET_ERROR_LOG = "failed to receive on socket: "
# CONNACK reasons that mean the login: MQTT 5 134/135, MQTT 3.1.1 4/5.
_LOGIN_REFUSED = {134, 135, 4, 5}


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
        self._failure_logged: dict[str, float] = {}
        self._started = False
        self._stopping = False
        self.reconnects = 0
        self.subscriptions_granted = 0  # SUBACKs that granted a filter, over all connects
        self.failures: dict[str, int] = {}
        # Why the last connection attempt failed (or the connection was lost), with the
        # config key to fix; None once connected. Set on paho's thread, read by /status.
        self.last_error: str | None = None
        self.failed_attempts = 0  # connection attempts failed since the last connect
        self._logged_error: str | None = None  # a repeat of this cause is not logged again
        self._attempt_error: str | None = None  # socket error seen during this attempt
        self._connack = False  # this attempt got a CONNACK (success or refusal)

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

        self._m_connected: Gauge | None = None
        self._m_reconnects: Counter | None = None
        self._m_failures: Counter | None = None
        if metrics is not None:
            reg = metrics.registry
            self._m_connected = Gauge(
                "edge_mqtt_connected", "1 while connected to the broker", registry=reg
            )
            self._m_reconnects = Counter(
                "edge_mqtt_reconnects", "Connections re-established after a loss", registry=reg
            )
            self._m_failures = Counter(
                "edge_mqtt_publish_failures",
                "Publishes the broker refused (PUBACK reason) or that could not be sent",
                ["reason"],
                registry=reg,
            )

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

    # --- status ----------------------------------------------------------------------

    def status_payload(self, state: str, reason: str | None = None) -> dict[str, Any]:
        return payloads.status(
            self.device, self.cfg.device.fleet, state, self._models(), reason=reason
        )

    def _models(self) -> dict[str, Any]:
        if self._status is None:
            return {}
        try:
            return dict(self._status().get("models", {}))
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
            self._fail(handle, "too_large", f"payload of {len(raw)} bytes is over the broker's"
                       f" maximum of {limit} bytes")  # fmt: skip
            return handle
        if qos == 0:
            info = self._client.publish(topic, raw, qos=0, retain=retain, properties=properties)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                handle._complete(0)
            else:
                self._fail(handle, "not_sent", paho.error_string(info.rc))
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
        self._fail(handle, "not_sent", paho.error_string(info.rc))
        return handle

    def _fail(self, handle: PublishHandle, reason: str, message: str, code: int = -1) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        if self._m_failures is not None:
            self._m_failures.labels(reason).inc()
        now = time.monotonic()
        # Once per reason and interval: a denied topic must not flood the journal.
        if (
            now - self._failure_logged.get(reason, -_FAILURE_LOG_INTERVAL_S)
            >= _FAILURE_LOG_INTERVAL_S
        ):
            self._failure_logged[reason] = now
            log.warning("mqtt: publish to %s refused: %s", handle.topic, message)
        handle._complete(code, message)

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
                self._fail(handle, reason, f"{rc.getName()} (reason {code})", code)
            else:
                handle._complete(code)
        except Exception:
            log.exception("mqtt: on_publish failed")

    # --- subscribe -------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int, handler: Handler) -> None:
        """Receive ``topic`` (a filter) now and after every reconnect; ``handler(Message)``."""
        with self._lock:
            self._subs[topic] = (qos, handler)
        self._client.message_callback_add(topic, self._dispatcher(topic, handler))
        if self.connected:
            self._client.subscribe(topic, qos=qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
        self._client.message_callback_remove(topic)
        if self.connected:
            self._client.unsubscribe(topic)

    def _dispatcher(self, topic: str, handler: Handler) -> Callable[..., None]:
        def dispatch(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            try:
                props = getattr(msg, "properties", None)
                handler(
                    Message(
                        topic=msg.topic,
                        payload=bytes(msg.payload),
                        qos=msg.qos,
                        retain=bool(msg.retain),
                        response_topic=getattr(props, "ResponseTopic", None),
                        correlation_data=getattr(props, "CorrelationData", None),
                    )
                )
            except Exception:
                log.exception("mqtt: handler for %s failed on %s", topic, msg.topic)

        return dispatch

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

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self._attempt_error = None
        self._connack = False

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        # Runs for every paho log line, sometimes under paho's locks: only remember.
        if level == paho.MQTT_LOG_ERR and buf.startswith(_SOCKET_ERROR_LOG):
            self._attempt_error = _clean(buf[len(_SOCKET_ERROR_LOG) :])

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        try:
            # Called from paho's `except OSError:` around the TCP connect and TLS handshake.
            error = sys.exc_info()[1]
            if isinstance(error, ssl.SSLError):
                self._connection_failed(*self._explain_tls(error))
            elif self.tls and isinstance(error, ConnectionResetError):
                # mosquitto resets a TLS handshake sent to a listener without TLS.
                self._connection_failed(*self._explain_tls(_clean(str(error))))
            elif error is not None:
                self._connection_failed(*self._explain_unreachable(_clean(str(error))))
            else:
                self._connection_failed(*self._explain_unreachable("connection failed"))
        except Exception:
            log.exception("mqtt: on_connect_fail failed")

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        try:
            self._connack = True
            if rc.is_failure:
                self._connection_failed(*self._explain_refusal(rc))
                return
            if self.last_error is not None:
                log.info(
                    "mqtt: %s:%d reachable again after %d failed attempt(s)",
                    self.host, self.port, self.failed_attempts,
                )  # fmt: skip
            self.last_error = self._logged_error = None
            self.failed_attempts = 0
            self._max_packet = getattr(props, "MaximumPacketSize", None)
            if self._ever_connected:
                self.reconnects += 1
                if self._m_reconnects is not None:
                    self._m_reconnects.inc()
            self._ever_connected = True
            with self._lock:
                subs = list(self._subs.items())
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
                self.last_error = f"connection lost: {self._attempt_error or rc.getName()}"
                log.warning("mqtt: disconnected (%s); reconnecting", rc.getName())
            elif not self._connack:
                # Closed before any CONNACK: a TLS alert after the handshake (the broker
                # refusing our client certificate), or the broker hanging up.
                error = self._attempt_error
                if error is None:
                    self._connection_failed(
                        f"the broker closed the connection before answering ({rc.getName()})",
                        "see the broker's log",
                    )
                elif "SSL" in error or "TLS" in error.upper():
                    self._connection_failed(*self._explain_tls(error))
                else:
                    self._connection_failed(*self._explain_unreachable(error))
            self._set_will()
        except Exception:
            log.exception("mqtt: on_disconnect failed")

    def _connection_failed(self, cause: str, fix: str, level: int = logging.ERROR) -> None:
        """Record a failed attempt; log it only when the cause differs from the last one."""
        self.failed_attempts += 1
        self.last_error = f"{cause}; {fix}"
        if cause == self._logged_error:
            return
        self._logged_error = cause
        log.log(
            level,
            "mqtt: cannot connect to %s:%d: %s; %s (retrying; logged again when the cause"
            " changes)",
            self.host, self.port, cause, fix,
        )  # fmt: skip

    def _explain_tls(self, error: ssl.SSLError | str) -> tuple[str, str]:
        """The cause of a TLS failure and the config key that fixes it."""
        m = self.cfg.mqtt
        if isinstance(error, ssl.SSLCertVerificationError):
            cause = f"TLS: certificate verify failed: {str(error.verify_message).rstrip('.')}"
            if error.verify_code == _HOSTNAME_MISMATCH:
                return cause, (
                    f"the host in mqtt.url ({m.url!r}) must be a name the broker's"
                    " certificate is issued for"
                )
            ca = f"now {m.ca!r}" if m.ca else "now empty: the system's trust store"
            return cause, f"mqtt.ca must be the CA that signed the broker's certificate ({ca})"
        text = _clean(str(error)) if isinstance(error, ssl.SSLError) else error
        if "ALERT" in text.upper() and re.search(r"CERTIFICATE|UNKNOWN_CA", text.upper()):
            have = f"now {m.cert!r} and {m.key!r}" if m.cert else "none is set"
            return f"TLS: the broker refused the client certificate: {text}", (
                f"mqtt.cert / mqtt.key must be a certificate the broker's CA signed ({have})"
            )
        return f"TLS: handshake failed: {text}", (
            f"mqtt.url ({m.url!r}) must name the broker's TLS port, mqtt.ca its CA"
        )

    def _explain_unreachable(self, text: str) -> tuple[str, str, int]:
        return (
            f"broker not reachable: {text}",
            f"is it running, and is mqtt.url ({self.cfg.mqtt.url!r}) right?",
            logging.WARNING,
        )

    def _explain_refusal(self, rc: ReasonCode) -> tuple[str, str]:
        m = self.cfg.mqtt
        code = int(rc.value)
        if code not in _LOGIN_REFUSED:
            return f"the broker refused the connection: {rc.getName()} (reason {code})", (
                "see the broker's log"
            )
        cause = f"the broker refused the login: {rc.getName()} (reason {code})"
        if not m.username:
            return cause, (
                "mqtt.username is empty: set mqtt.username and mqtt.password_file, or a"
                " client certificate in mqtt.cert / mqtt.key"
            )
        password = f"{m.password_file!r}" if m.password_file else "not set"
        return cause, (
            f"check user {m.username!r} (mqtt.username) and its password in"
            f" mqtt.password_file ({password})"
        )

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        if self._m_connected is not None:
            self._m_connected.set(1 if up else 0)
        for fn in list(self._listeners):
            try:
                fn(up)
            except Exception:
                log.exception("mqtt: connection listener failed")


def _file(value: str) -> str | None:
    return str(resolve_secret_path(value)) if value else None


def _clean(text: str) -> str:
    """An ssl error's text without OpenSSL's source location."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text).strip()


def _response_properties(correlation_data: bytes) -> Properties:
    """PUBLISH properties for an answer to a request carrying ``correlation_data``."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation_data
    return props
