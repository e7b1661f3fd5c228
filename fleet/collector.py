"""The collector service behind ``edge-fleet collect`` (the command is fleet/collect.py).

One MQTT client with a persistent session (a stable client id; under MQTT 5
clean_start=False and a session expiry, under 3.1.1 clean_session=False), so the broker
queues for the collector while it restarts, and
manual acknowledgement: a message's PUBACK goes out only after the transaction that
stored it committed, so a collector killed before its commit leaves the message at the
broker. A writer thread takes what arrived (``fleet.intake``), stores it with one
``Database.store`` per transaction, PUBACKs, then publishes one ack per device naming
the seq ranges stored (the device deletes rows only then).

What mosquitto 2.0.11 does (measured with the broker of broker-config/ while writing
this; tests/fleet/test_collect.py checks the parts the collector relies on):

- A message on a shared subscription goes to ONE member of the group, round robin,
  and an offline member with a persistent session is not skipped: its share is queued
  for it until it comes back or its session expires. Two collectors in a group, one
  down: half the stream waits for it (its devices resend after their ack timeout, and
  the resent batch may land on the live one). So a collector that leaves a group for
  good should not keep its session: ``--session-expiry 0``.
- Messages a member received but did not PUBACK stay with that member's session, even
  while another member is online; the broker resends them (DUP, same packet ids) when
  the same client id reconnects. kill -9 before the commit therefore loses nothing.
- Retained messages ARE sent to a new shared subscription (unlike MQTT 5 §4.8.2 says),
  once to the subscribing member. Status is a plain subscription here anyway: every
  collector must see every device's retained status to know its fleet.
- The client's Receive Maximum bounds only the first window: every PUBACK lets that
  many more messages out, so unacknowledged messages pile up while the database is
  down. ``fleet.intake`` bounds the bytes it holds and sheds the rest (no PUBACK), and
  the collector reconnects once it has caught up, because an MQTT 5 broker resends
  unacknowledged messages only on a new connection.

Collectors share the stream one of two ways. MQTT 5: a shared subscription
(``--group``), the broker hands each message to one member. MQTT 3.1.1 has none (and NATS
has none at all): ``--partition I/N``, every collector subscribes to everything and keeps
only the devices with ``zlib.crc32(device) % N == I``; the rest it PUBACKs unstored
(counted as skipped, reason ``other_partition``), so each device has exactly one owner,
whoever is connected, and its acks come from that owner only.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from agent.wire import payloads
from agent.wire.errors import UsageError

from fleet.collect_metrics import CollectorMetrics
from fleet.connection import BrokerOptions, FleetClient, connect
from fleet.connection import disconnect as disconnect_client
from fleet.db import Batch, Database, DatabaseUnavailable
from fleet.intake import KINDS, Delivery, Intake, Pending

log = logging.getLogger(__name__)

DEFAULT_GROUP = "edge-collect"
MAX_PARTITIONS = 64
SESSION_EXPIRY_S = 86400
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0
# A transaction of one message that fails (not "database unavailable") this many times
# is dropped: one bad message must not stop the stream.
POISON_TRIES = 3
STOP_FLUSH_S = 5.0  # at SIGTERM, how long to wait for the broker to take the last acks


@dataclass(frozen=True)
class Settings:
    client_id: str
    group: str = DEFAULT_GROUP
    fleet: str | None = None
    batch_rows: int = 5000
    linger_s: float = 0.05
    max_bytes: int = 64 << 20
    receive_maximum: int = 200
    session_expiry_s: int = SESSION_EXPIRY_S
    partition: tuple[int, int] | None = None  # (I, N): the devices with crc32 % N == I
    group_given: bool = False  # --group on the command line: it needs MQTT 5


def default_client_id(group: str) -> str:
    return f"edge-collect-{socket.gethostname()}-{group}"


def partition_of(device: str, count: int) -> int:
    """The partition a device belongs to among ``count``: the same in every collector."""
    return zlib.crc32(device.encode()) % count


def parse_partition(value: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N <= 64, else a ``UsageError`` naming the flag."""
    index, sep, count = value.partition("/")
    if sep and index.isdigit() and count.isdigit():
        i, n = int(index), int(count)
        if 0 <= i < n <= MAX_PARTITIONS:
            return i, n
    raise UsageError(
        f"--partition: {value!r} is not I/N with 0 <= I < N <= {MAX_PARTITIONS} (e.g. 0/2)"
    )


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or adjacent ranges joined: [1,10],[11,20] -> [1,20]."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


class Collector:
    """The service: a persistent MQTT session in, one writer thread to the database."""

    def __init__(
        self,
        options: BrokerOptions,
        database: Database,
        settings: Settings,
        metrics: CollectorMetrics | None = None,
    ) -> None:
        self.options = options
        self.topics = options.topics
        self.database = database
        self.settings = settings
        self.metrics = metrics or CollectorMetrics()
        self.intake = Intake(
            self.topics,
            Batch,
            self.metrics,
            fleet=settings.fleet,
            batch_rows=settings.batch_rows,
            max_bytes=settings.max_bytes,
            linger_s=settings.linger_s,
        )
        self.client: FleetClient | None = None
        self.failed: BaseException | None = None  # the writer's crash, if any
        self._generation = 0  # connections so far; a PUBACK goes only on its own one
        self._ack_lock = threading.Lock()
        # Our ack publishes the broker has not PUBACKed yet, for the stop to wait on. Its
        # own lock, never held while calling paho: paho calls on_publish holding its
        # message lock, which publish() takes too. A PUBACK may be handled before
        # publish() returns the mid: such mids wait in _early.
        self._sent_lock = threading.Lock()
        self._unconfirmed: set[int] = set()
        self._early: set[int] = set()
        self._stopping = threading.Event()
        self._down_since: float | None = None
        self._owned: dict[str, bool] = {}  # device -> in our --partition (crc32 once each)
        self._writer = threading.Thread(target=self._write_loop, name="collector-writer")

    def subscriptions(self, mqtt5: bool = True) -> list[tuple[str, int]]:
        """A shared subscription of the group under MQTT 5; plain ones with --partition
        or under 3.1.1, which has no shared subscriptions."""
        t = self.topics
        share = f"$share/{self.settings.group}/" if mqtt5 and not self.settings.partition else ""
        return [
            (share + t.all_results(), 1),
            (share + t.all_health(), 1),
            (share + t.all_events(), 1),
            # Not shared: every collector learns every device's fleet from it, and the
            # status table dedupes by (device, since, state).
            (t.all_status(), 1),
        ]

    def _subscriptions_for(self, client: FleetClient) -> list[tuple[str, int]]:
        if self.settings.group_given and not client.mqtt5:
            return []  # start() refuses: subscribing without the group would take it all
        return self.subscriptions(client.mqtt5)

    def start(self) -> None:
        """Connect (``BrokerUnavailable`` when the broker cannot be reached) and run."""
        client = connect(
            self.options,
            purpose="collect",
            subscriptions=self._subscriptions_for,
            on_message=self._on_message,
            client_id=self.settings.client_id,
            session_expiry_s=self.settings.session_expiry_s,
            receive_maximum=self.settings.receive_maximum,
            manual_ack=True,
            on_session=self._on_session,
        )
        if self.settings.group_given and not client.mqtt5:
            disconnect_client(client)
            raise UsageError(
                f"--group: broker {client.url} speaks MQTT 3.1.1, which has no shared"
                " subscriptions; split the devices between collectors with --partition I/N"
            )
        client.on_publish = self._on_publish
        self.client = client
        self.metrics.watch(client.is_connected, self.intake.held)
        self._writer.start()

    def stop(self) -> None:
        """Finish the transaction under way and what is queued, ack, disconnect."""
        self.intake.close()
        self._stopping.set()
        if self._writer.is_alive():
            self._writer.join()
        deadline = time.monotonic() + STOP_FLUSH_S
        while self._unconfirmed and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.client is not None:
            disconnect_client(self.client)
        log.info("collector: stopped")

    # --- the MQTT thread -----------------------------------------------------------

    def _on_session(self, client: FleetClient, session_present: bool) -> None:
        with self._ack_lock:
            self.client = client
            self._generation += 1
            first = self._generation == 1
        self.intake.reconnected()
        sid = self.settings.client_id
        if session_present:
            log.info("collector: session %s resumed", sid)
        elif first:
            log.info("collector: new session %s", sid)
        else:
            log.warning(
                "collector: the broker had no session %s any more: what devices sent"
                " meanwhile was not queued for it (they resend unacknowledged results)",
                sid,
            )

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        device = self.topics.device_of(msg.topic)
        payload = bytes(msg.payload)  # paho's is bytes already: no copy
        d = Delivery(msg.mid, msg.qos, self._generation, kind, device or "", msg.topic, payload)
        if device is not None and not self._mine(device):
            self.metrics.skipped("other_partition")
            self._puback([d])  # its owner gets the message too, and stores and acks it
        elif kind not in KINDS or device is None or not self.intake.receive(d):
            self._puback([d])

    def _mine(self, device: str) -> bool:
        part = self.settings.partition
        if part is None:
            return True
        mine = self._owned.get(device)
        if mine is None:
            mine = self._owned[device] = partition_of(device, part[1]) == part[0]
        return mine

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._sent_lock:
            if mid in self._unconfirmed:
                self._unconfirmed.discard(mid)
            else:
                self._early.add(mid)

    def _puback(self, deliveries: list[Delivery]) -> None:
        # Under the lock a reconnect cannot slip in between the generation check and
        # the PUBACK: a packet id of an old connection may name another message now.
        # (paho's ack() only queues the packet; it takes no lock paho holds while it
        # calls on_message or on_connect, which take this one.)
        with self._ack_lock:
            client = self.client
            for d in deliveries:
                if d.qos and d.generation == self._generation and client is not None:
                    client.ack(d.mid, d.qos)

    # --- the writer thread ---------------------------------------------------------

    def _write_loop(self) -> None:
        log.info("collector: writer started")
        try:
            while not self._stopping.is_set():
                self._housekeeping()
                pending = self.intake.take(0.25)
                if pending is not None:
                    self._commit(pending)
            while (pending := self.intake.take(0)) is not None:
                self._commit(pending)  # stopping: one attempt each
        except BaseException as e:
            self.failed = e
            log.exception("collector: the writer failed")
        finally:
            log.info("collector: writer stopped")

    def _housekeeping(self) -> None:
        due = self.intake.acks_due()
        if due:
            self._puback(due)
        if self.intake.caught_up():
            self._redeliver()

    def _redeliver(self) -> None:
        """Reconnect: the broker resends what was shed (never PUBACKed) on the new one."""
        client = self.client
        assert client is not None
        shed = self.intake.reconnected()
        log.info("collector: caught up; reconnecting for the %d messages left at the broker", shed)
        client.disconnect()
        client.loop_stop()
        try:
            client.reconnect()
        except OSError as e:
            log.warning("collector: reconnect failed: %s (paho retries)", e)
        client.loop_start()

    def _commit(self, pending: Pending) -> None:
        """Store ``pending`` (retrying while the database is down), then PUBACK and ack."""
        parts = [pending]
        backoff = RETRY_MIN_S
        while parts:
            part = parts[0]
            started = time.perf_counter()
            try:
                report = self.database.store(part.batch)
            except DatabaseUnavailable as e:
                self._database_down(e, part)
                if self._stopping.is_set() or self._stopping.wait(backoff):
                    return self._give_up(parts)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            except Exception as e:
                if len(part.deliveries) > 1:
                    log.warning(
                        "collector: a transaction of %d messages failed (%s: %s); storing"
                        " them one by one",
                        len(part.deliveries), type(e).__name__, e,
                    )  # fmt: skip
                    parts[0:1] = self.intake.split(part)
                    continue
                part.attempts += 1
                if self._stopping.is_set():
                    return self._give_up(parts)
                if part.attempts < POISON_TRIES:
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                d = part.deliveries[0]
                log.error("collector: %s not stored, dropped: %s: %s", d.topic, type(e).__name__, e)
                self.metrics.failed_messages.labels(d.kind).inc()
                self.intake.done(part)
                self._puback(part.deliveries)
                parts.pop(0)
                continue
            self._database_up()
            inserted = {
                "results": report.inserted,
                "feedback": report.feedback,
                "health": report.health,
                "events": report.events,
                "status": report.status,
            }
            self.metrics.stored(inserted, report.duplicates, time.perf_counter() - started)
            self.intake.done(part)
            self._puback(part.deliveries)
            self._send_acks(part.deliveries)
            parts.pop(0)
            backoff = RETRY_MIN_S

    def _give_up(self, parts: list[Pending]) -> None:
        held = sum(len(p.deliveries) for p in parts)
        log.warning("collector: stopping with %d messages not stored; the broker keeps them", held)
        for p in parts:
            self.intake.done(p)

    def _send_acks(self, deliveries: list[Delivery]) -> None:
        stored: dict[str, list[tuple[int, int]]] = {}
        for d in deliveries:
            if d.seqs is not None:
                stored.setdefault(d.device, []).append(d.seqs)
        client = self.client
        assert client is not None
        step = payloads.MAX_ACK_RANGES
        for device, ranges in stored.items():
            merged = merge_ranges(ranges)
            for i in range(0, len(merged), step):
                ack = payloads.ack(device, merged[i : i + step], collector=self.settings.client_id)
                info = client.publish(self.topics.results_ack(device), payloads.encode(ack), qos=1)
                with self._sent_lock:
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                    else:
                        self._unconfirmed.add(info.mid)
                self.metrics.acks.inc()

    def _database_down(self, e: Exception, part: Pending) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.metrics.database_up.set(0)
            log.warning(
                "collector: database unavailable (%s); holding %d rows, retrying", e, part.rows
            )

    def _database_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "collector: database back after %.0f s", time.monotonic() - self._down_since
            )
            self._down_since = None
            self.metrics.database_up.set(1)
