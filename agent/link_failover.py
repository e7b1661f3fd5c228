"""Which broker URL the link tries next, with which MQTT version, and how long it waits.

Pure policy, no sockets: ``agent/paho_link.py`` reports what each attempt came to
(connected, failed, lost, refused for the version) and asks for the next one.

- Failover: a failed attempt or a lost connection moves to the next URL (round robin).
  A move after one failure waits uniform(0, reconnect_min_s); after a whole round of
  URLs without a connect, full jitter: uniform(0, min(reconnect_max_s, reconnect_min_s
  * 2**rounds)), so devices that lost the same node do not come back in step.
- ``mqtt.protocol = "auto"``: MQTT 5 first. A broker that answers it does not speak 5
  (CONNACK 0x84, or the 3.1.1 return code 1 that NATS sends, which paho reports as
  0x84) gets 3.1.1 from then on. A broker that hangs up on a v5 CONNECT without any
  CONNACK is probed with 3.1.1 only after two such hang-ups in a row, and kept on 3.1.1
  only if that probe connects: one CONNECT dropped while a cluster elects a leader
  must not downgrade a broker that speaks 5.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.config import MqttConfig
from agent.link_diagnosis import Trouble

log = logging.getLogger("agent.paho_link")

V5, V311 = "5", "3.1.1"
# v5 CONNECTs closed without any CONNACK, in a row, before a URL is probed with 3.1.1.
DROPS_BEFORE_PROBE = 2


@dataclass
class Endpoint:
    """One broker URL of ``mqtt.urls`` (or ``mqtt.url``) and what the link learnt of it."""

    url: str
    key: str  # the config key naming it, for messages: mqtt.url or mqtt.urls[i]
    host: str
    port: int
    tls: bool
    protocol: str  # what the next attempt speaks: "5" or "3.1.1"
    learn: bool  # mqtt.protocol = "auto" and not learnt yet
    trouble: Trouble
    v5_drops: int = 0  # v5 CONNECTs in a row closed without a CONNACK
    probing: bool = False  # the next attempt is a 3.1.1 probe after such hang-ups

    @property
    def speaks(self) -> str:
        return V311 if self.probing else self.protocol

    @property
    def may_learn(self) -> bool:
        """auto and still on MQTT 5: a "not MQTT 5" answer teaches, it is no failure."""
        return self.learn and self.protocol == V5 and not self.probing


def endpoints(m: MqttConfig) -> list[Endpoint]:
    """The configured brokers in failover order (``mqtt.urls`` wins over ``mqtt.url``)."""
    made = []
    for i, url in enumerate(m.broker_urls):
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        host = parts.hostname or "localhost"
        port = parts.port or (8883 if tls else 1883)
        key = f"mqtt.urls[{i}]" if m.urls else "mqtt.url"
        protocol = V311 if m.protocol == V311 else V5
        trouble = Trouble(m, host, port, tls=tls, url=url, key=key)
        made.append(Endpoint(url, key, host, port, tls, protocol, m.protocol == "auto", trouble))
    return made


class Failover:
    """The link's place in the URL list, its moves and its waits."""

    def __init__(self, m: MqttConfig, rand: Callable[[], float] = random.random) -> None:
        self.endpoints = endpoints(m)
        if not self.endpoints:
            raise ValueError("no broker URL: mqtt.url and mqtt.urls are empty")
        self.min_s, self.max_s = m.reconnect_min_s, m.reconnect_max_s
        self.index = 0
        self.moves = 0  # changes of URL
        self.failures = 0  # attempts failed since the last connect
        self._rand = rand

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self.index]

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def connected(self) -> None:
        ep = self.current
        self.failures = 0
        ep.v5_drops = 0
        if ep.probing:
            ep.probing, ep.protocol, ep.learn = False, V311, False
            log.warning("mqtt: %s closes MQTT 5 connections without an answer but takes 3.1.1:"
                        " using MQTT 3.1.1 for it", ep.url)  # fmt: skip

    def unsupported(self) -> float:
        """The broker answered that it does not speak our version; the wait before the
        next attempt (at once on the same URL when it can learn 3.1.1)."""
        ep = self.current
        if ep.may_learn:
            ep.protocol, ep.learn = V311, False
            log.warning("mqtt: %s does not speak MQTT 5 (CONNACK: unsupported protocol"
                        " version): using MQTT 3.1.1 for it", ep.url)  # fmt: skip
            return 0.0
        return self.failed()

    def dropped(self) -> float:
        """Closed after our CONNECT without any CONNACK; the wait before the next attempt."""
        ep = self.current
        if ep.probing:  # 3.1.1 fared no better: the hang-ups were not about the version
            ep.v5_drops = 0
        elif ep.learn and ep.protocol == V5:
            ep.v5_drops += 1
            if ep.v5_drops >= DROPS_BEFORE_PROBE:
                ep.probing = True
                return self._rand() * self.min_s  # the probe goes to the same URL
        return self.failed()

    def failed(self) -> float:
        """An attempt that did not connect: the next URL, after a wait."""
        ep = self.current
        ep.probing = False  # a probe that failed: the hang-ups were not about the version
        self.failures += 1
        self._move()
        if self.failures % len(self.endpoints):
            return self._rand() * self.min_s
        rounds = min(self.failures // len(self.endpoints), 32)
        return self._rand() * min(self.max_s, self.min_s * 2.0**rounds)

    def lost(self) -> float:
        """A connection that was up has ended: the next URL, after a short wait."""
        self._move()
        return self._rand() * self.min_s

    def _move(self) -> None:
        if len(self.endpoints) > 1:
            self.index = (self.index + 1) % len(self.endpoints)
            self.moves += 1
