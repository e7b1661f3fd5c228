"""The device's retained status on the broker, as the MQTT link keeps it.

``online`` on every connect, ``offline`` as each connection's last will and on a clean
stop. A will can land late: NATS publishes the will of a dead or taken-over connection
after the device already said ``online`` through another node. So the device reads its
own status topic too, and while connected answers an ``offline`` of its own with
``online`` again, at most once a second (a second one within that second is answered
when it ends, never dropped: the last word must be ``online``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.config import Config
from agent.link import Message, PublishHandle
from agent.wire import payloads
from agent.wire.topics import Topics

log = logging.getLogger("agent.paho_link")

REASSERT_S = 1.0  # an offline of ours is answered at most this often

Publish = Callable[..., PublishHandle]


class DeviceStatus:
    """Builds, publishes and guards ``{prefix}/devices/{device}/status``."""

    def __init__(
        self,
        cfg: Config,
        publish: Publish,
        connected: Callable[[], bool],
        report: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = cfg.device.id
        self.topic = Topics(cfg.mqtt.topic_prefix).status(self.device)
        self._publish = publish
        self._connected = connected
        self._report = report  # -> the /status body: models, tags, trusted keys
        self.leaving = False  # stopping: our own offline is not answered
        self.reasserts = 0  # online published again over an offline of ours
        self._lock = threading.Lock()
        # Held from "not leaving" to the online being queued, and by leave(): so a
        # re-assert racing a stop queues its online before the stop's offline, never after.
        self._leave_lock = threading.Lock()
        self._last = -REASSERT_S
        self._timer: threading.Timer | None = None

    def payload(self, state: str, reason: str | None = None) -> dict[str, Any]:
        report = self._read_report()
        return payloads.status(
            self.device,
            self.cfg.device.fleet,
            state,
            dict(report.get("models", {})),
            reason=reason,
            tags=report.get("tags", self.cfg.device.tags),
            trusted_keys=report.get("trusted_keys"),
        )

    def will(self) -> str:
        """The last will of the next connection (its "since" and models are today's)."""
        return json.dumps(self.payload("offline", reason="connection lost"))

    def publish(self, state: str = "online", reason: str | None = None) -> PublishHandle:
        """Refresh the retained status; only while connected: a status queued offline
        could land after the fresh one a connect sends, leaving a stale one behind."""
        if not self._connected():
            handle = PublishHandle(self.topic)
            handle._complete(-1, "not connected; the status is sent on connect")
            return handle
        return self._publish(self.topic, self.payload(state, reason), qos=1, retain=True)

    def seen(self, msg: Message) -> None:
        """A status of ours from the broker: an ``offline`` while connected is a late will."""
        try:
            state = json.loads(msg.payload).get("state")
        except (ValueError, AttributeError):
            return
        if state != "offline" or self.leaving or not self._connected():
            return
        with self._lock:
            if self._timer is not None:
                return  # an answer is due already
            wait = self._last + REASSERT_S - time.monotonic()
            if wait > 0:
                self._timer = threading.Timer(wait, self._reassert)
                self._timer.name, self._timer.daemon = "mqtt-reassert", True
                self._timer.start()
                return
        self._reassert()

    def leave(self, leaving: bool = True) -> None:
        """Stopping (or started again): while leaving, our own offline is not answered."""
        with self._leave_lock:
            self.leaving = leaving

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _reassert(self) -> None:
        try:
            with self._lock:
                self._timer = None
                self._last = time.monotonic()
            with self._leave_lock:
                if self.leaving or not self._connected():
                    return
                self.reasserts += 1
                log.info("mqtt: the broker holds an offline status of ours (a late will of"
                         " an earlier connection): publishing online again")  # fmt: skip
                self.publish("online")
        except Exception:
            log.exception("mqtt: re-asserting the online status failed")

    def _read_report(self) -> Mapping[str, Any]:
        if self._report is None:
            return {}
        try:
            return self._report()
        except Exception:
            log.exception("mqtt: reading the models for the status failed")
            return {}
