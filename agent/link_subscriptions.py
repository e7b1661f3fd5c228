"""The link's subscriptions: renewed on every connect, asked for again when refused.

Each connection starts clean (a move to another broker, a reconnect), so ``renew()``
subscribes every registered filter again from ``on_connect``. A SUBACK that refuses a
filter with 0x80 (NATS does this while it elects the JetStream leader that the
subscription's consumer needs) is retried about a second later, jittered, until the
broker grants it; the retries are counted. Other refusals (MQTT 5's 0x87 not
authorized, a bad filter) are logged, not retried.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from agent.link import Handler, dispatcher

log = logging.getLogger("agent.paho_link")

RESUBSCRIBE_S = 1.0  # a refused subscription is asked for again after about this long
# SUBACK 0x80, the only failure MQTT 3.1.1 knows; what NATS answers during an election.
UNSPECIFIED = 0x80


class Subscriptions:
    """Filters and their handlers on one paho client, across its connections."""

    def __init__(self, client: paho.Client, metrics: Any = None, own: str = "") -> None:
        self._client = client
        self._m = metrics  # agent.metrics.LinkMetrics, or None
        self._own = own  # the link's own filter, not counted as a component's
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._mids: dict[int, str] = {}  # SUBSCRIBE packet id -> its filter
        self._up = False
        self.granted = 0  # SUBACKs that granted a component's filter, ever
        self.retries = 0  # filters asked for again after a refused SUBACK

    def add(self, topic: str, qos: int, handler: Handler) -> None:
        self._client.message_callback_add(topic, dispatcher(topic, handler))
        # renew() lists the filters and marks the link up under the same lock: a filter
        # added meanwhile is in that list or subscribes here (twice is harmless).
        with self._lock:
            self._subs[topic] = (qos, handler)
            up = self._up
        if up:
            self._send(topic, qos)

    def remove(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
            up = self._up
        self._client.message_callback_remove(topic)
        if up:
            self._client.unsubscribe(topic)

    def renew(self) -> None:
        """A connection is up: subscribe every filter (from on_connect)."""
        with self._lock:
            self._up = True
            self._mids.clear()  # SUBACKs of an earlier connection never come
            subs = [(topic, qos) for topic, (qos, _) in self._subs.items()]
        for topic, qos in subs:
            self._send(topic, qos)

    def down(self) -> None:
        with self._lock:
            self._up = False

    def _send(self, topic: str, qos: int) -> None:
        # Under our lock: on_subscribe takes it too, so the SUBACK cannot beat the record.
        with self._lock:
            _, mid = self._client.subscribe(topic, qos=qos)
            if mid is not None:
                self._mids[mid] = topic

    def on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, rcs: list[ReasonCode], p: Any
    ) -> None:
        try:
            with self._lock:
                topic = self._mids.pop(mid, None)
            for rc in rcs:
                if not rc.is_failure:
                    self.granted += topic != self._own
                elif topic is not None and int(rc.value) == UNSPECIFIED:
                    self._retry(topic, rc)
                else:  # not authorized, a bad filter: asking again would not help
                    log.error("mqtt: subscription to %s refused by the broker: %s (reason %d)",
                              topic, rc.getName(), int(rc.value))  # fmt: skip
        except Exception:
            log.exception("mqtt: on_subscribe failed")

    def _retry(self, topic: str, rc: ReasonCode) -> None:
        self.retries += 1
        if self._m is not None:
            self._m.subscribe_retries.inc()
        if self.retries == 1 or self.retries % 100 == 0:
            log.warning("mqtt: subscription to %s refused by the broker (%s); asking again"
                        " (%d retries so far)", topic, rc.getName(), self.retries)  # fmt: skip

        def again() -> None:
            try:
                with self._lock:
                    sub = self._subs.get(topic) if self._up else None
                if sub is not None:
                    self._send(topic, sub[0])
            except Exception:
                log.exception("mqtt: subscribing to %s again failed", topic)

        timer = threading.Timer(RESUBSCRIBE_S * random.uniform(0.5, 1.5), again)
        timer.name, timer.daemon = "mqtt-resubscribe", True
        timer.start()
