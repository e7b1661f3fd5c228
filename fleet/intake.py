"""What the collector does with each MQTT message before the database sees it.

The MQTT thread hands every message to ``Intake.receive``: it is decoded and checked
with ``agent.wire.payloads``, filtered by fleet, and added to the open ``Batch`` of the
next transaction together with the message id to PUBACK once that transaction has
committed. The writer thread takes whole ``Pending`` transactions with ``take``.

Memory is bounded by the payload bytes held (``max_bytes``): a message that would pass
the bound is *shed*, neither stored nor PUBACKed, so it stays in the collector's session
at the broker. Flow control cannot do this job alone: mosquitto 2.0.11 honours the
client's Receive Maximum only for its first window and then sends that many more
messages for every PUBACK (measured; see fleet/collector.py), so a collector whose
database is down would otherwise buffer the whole stream. An MQTT 5 broker resends
unacknowledged messages only on a new connection, hence ``shed`` tells the collector to
reconnect once it has caught up.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.wire import payloads
from agent.wire.topics import Topics

from fleet.db import Batch
from fleet.db_batch import MAX_BIGINT

log = logging.getLogger(__name__)

KINDS = ("results", "health", "events", "status")
# How long results/events of a device whose fleet is not known yet wait for its status
# (--fleet only): its retained status normally arrives right after the subscription.
PARK_S = 10.0


class Counts(Protocol):
    """Where the intake counts what it saw (the collector's Prometheus metrics)."""

    def received(self, kind: str) -> None: ...
    def invalid(self, kind: str) -> None: ...
    def skipped(self, reason: str) -> None: ...
    def shed(self) -> None: ...


@dataclass(slots=True)
class Delivery:
    """One message the collector holds: PUBACK it after commit, ack its seq range."""

    mid: int
    qos: int
    generation: int  # the connection it came on: a PUBACK goes only on that one
    kind: str
    device: str
    topic: str
    payload: bytes
    seqs: tuple[int, int] | None = None  # results: the batch's [first, last]


@dataclass
class Pending:
    """One future transaction: a Batch and the deliveries it commits."""

    batch: Batch
    opened: float
    deliveries: list[Delivery] = field(default_factory=list)
    nbytes: int = 0
    attempts: int = 0  # failures of a single-message transaction (not the database's)

    @property
    def rows(self) -> int:
        return len(self.batch)


@dataclass(slots=True)
class _Parked:
    at: float
    delivery: Delivery


class Intake:
    """Checked messages -> batches of at most ``batch_rows`` rows, bounded by ``max_bytes``."""

    def __init__(
        self,
        topics: Topics,
        new_batch: Callable[[], Batch],
        counts: Counts,
        *,
        fleet: str | None = None,
        batch_rows: int = 5000,
        max_bytes: int = 64 << 20,
        linger_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.new_batch = new_batch
        self.counts = counts
        self.fleet = fleet
        self.batch_rows = batch_rows
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.clock = clock
        self.fleets: dict[str, str] = {}  # device -> fleet, from status and health
        self.nbytes = 0  # payload bytes held: queued, parked and being stored
        self.shed_messages = 0  # since the last reconnect
        self.closed = False
        self._queue: list[Pending] = []
        self._parked: dict[str, list[_Parked]] = {}
        self._refused: set[str] = set()  # devices whose refusal was logged already
        self._ack_later: list[Delivery] = []  # parked, then skipped once the fleet was known
        self._cond = threading.Condition()

    # --- the MQTT thread -----------------------------------------------------------

    def receive(self, delivery: Delivery) -> bool:
        """Take a message; False: PUBACK it now (refused, skipped, nothing to store).

        True means the intake holds it (queued or parked: PUBACK after its commit) or
        shed it (never PUBACK: the broker keeps it for the next connection).
        """
        with self._cond:
            if self.closed:
                return True  # stopping: left at the broker for the next run
            self.counts.received(delivery.kind)
            if self.nbytes + len(delivery.payload) > self.max_bytes:
                if not self.shed_messages:
                    log.warning(
                        "collector: %d MiB held, the database is behind; leaving messages"
                        " at the broker until it catches up",
                        self.max_bytes >> 20,
                    )
                self.shed_messages += 1
                self.counts.shed()
                return True
            return self._route(delivery)

    def _route(self, d: Delivery) -> bool:
        try:
            return self._accept(d)
        except payloads.InvalidPayload as e:  # from the checks, or a value Batch refuses
            self.counts.invalid(d.kind)
            # The reason names the topic. Once per device: a device sending garbage in a
            # loop must not flood the log; its next valid message resets this.
            if d.device not in self._refused:
                self._refused.add(d.device)
                log.warning("collector: refused %s", e)
            else:
                log.debug("collector: refused %s", e)
            return False

    def _accept(self, d: Delivery) -> bool:
        obj = self._check(d)
        self._refused.discard(d.device)
        if obj is None:
            return False  # a cleared retained status: nothing to store
        if d.kind in ("status", "health") and isinstance(obj.get("fleet"), str):
            self._learn(d.device, obj["fleet"])
        if self.fleet is not None:
            fleet = obj.get("fleet") if d.kind in ("status", "health") else None
            fleet = fleet if isinstance(fleet, str) else self.fleets.get(d.device)
            if fleet is None:
                self._parked.setdefault(d.device, []).append(_Parked(self.clock(), d))
                self.nbytes += len(d.payload)
                return True
            if fleet != self.fleet:
                self.counts.skipped("other_fleet")
                return False
        return self._add(d, obj)

    def _check(self, d: Delivery) -> dict[str, Any] | None:
        if d.kind == "status" and not d.payload:
            return None
        obj = _decode(d.payload, d.topic)
        if d.kind == "results":
            obj = payloads.check_results(obj, d.topic)
            # Checked here, not by Batch.add_results midway: a refused message must
            # leave no rows behind in the transaction it was added to.
            for i, row in enumerate(obj["results"]):
                if row["seq"] > MAX_BIGINT:
                    raise payloads.InvalidPayload(
                        f"{d.topic}: results[{i}].seq: {row['seq']} is past 2**63-1"
                    )
        elif d.kind == "health":
            obj = payloads.check_health(obj, d.topic)
        elif d.kind == "events":
            obj = payloads.check_event(obj, d.topic)
        else:
            obj = payloads.check_status(obj, d.topic)
        named = obj.get("device")
        if named is not None and named != d.device:
            raise payloads.InvalidPayload(
                f"{d.topic}: device: {named!r:.60} is not the topic's device {d.device!r}"
            )
        return obj

    def _add(self, d: Delivery, obj: dict[str, Any]) -> bool:
        if d.kind == "results" and not obj["results"]:
            return False
        pending = self._open()
        self._fill(pending, d, obj)
        self.nbytes += len(d.payload)
        if pending.rows >= self.batch_rows or len(self._queue) > 1:
            self._cond.notify_all()
        return True

    @staticmethod
    def _fill(pending: Pending, d: Delivery, obj: dict[str, Any]) -> None:
        if d.kind == "results":
            d.seqs = pending.batch.add_results(d.device, obj["results"])
        elif d.kind == "health":
            pending.batch.add_health(d.device, obj)
        elif d.kind == "events":
            pending.batch.add_event(d.device, obj, d.payload)
        else:
            pending.batch.add_status(d.device, obj)
        pending.deliveries.append(d)
        pending.nbytes += len(d.payload)

    def _open(self) -> Pending:
        if not self._queue or self._queue[-1].rows >= self.batch_rows:
            self._queue.append(Pending(self.new_batch(), self.clock()))
        if len(self._queue) == 1:
            self._cond.notify_all()  # the writer waits for the first message, then lingers
        return self._queue[-1]

    def _learn(self, device: str, fleet: str) -> None:
        self.fleets[device] = fleet
        parked = self._parked.pop(device, None)
        for p in parked or ():
            self.nbytes -= len(p.delivery.payload)
            if self._route(p.delivery) is False:
                self._ack_later.append(p.delivery)

    # --- the writer thread ---------------------------------------------------------

    def take(self, timeout: float) -> Pending | None:
        """The next transaction: full, or its first message older than ``linger_s``."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                if self._queue:
                    head = self._queue[0]
                    due = head.opened + self.linger_s
                    full = head.rows >= self.batch_rows or len(self._queue) > 1
                    if full or self.closed or self.clock() >= due:
                        return self._queue.pop(0)
                    wait = min(due, deadline) - self.clock()
                elif self.closed:
                    return None
                else:
                    wait = deadline - self.clock()
                if wait <= 0:
                    return None
                self._cond.wait(wait)

    def done(self, pending: Pending) -> None:
        """The transaction is over (committed, or given up): its bytes are free again."""
        with self._cond:
            self.nbytes -= pending.nbytes

    def split(self, pending: Pending) -> list[Pending]:
        """One transaction per delivery, each checked again from its payload (the bytes
        stay counted: ``done`` each part instead of the whole)."""
        parts = []
        for d in pending.deliveries:
            obj = self._check(d)
            assert obj is not None  # it was accepted once
            part = Pending(self.new_batch(), self.clock())
            self._fill(part, d, obj)
            parts.append(part)
        return parts

    def acks_due(self) -> list[Delivery]:
        """Deliveries to PUBACK without storing: released by a fleet learned, or parked
        too long (their device resends results it gets no ack for)."""
        now = self.clock()
        with self._cond:
            due, self._ack_later = self._ack_later, []
            for device in [d for d, ps in self._parked.items() if now - ps[0].at > PARK_S]:
                parked = self._parked.pop(device)
                log.warning(
                    "collector: %s: fleet unknown after %.0f s (no status or health seen);"
                    " %d messages not stored",
                    device, PARK_S, len(parked),
                )  # fmt: skip
                for p in parked:
                    self.nbytes -= len(p.delivery.payload)
                    self.counts.skipped("unknown_fleet")
                    due.append(p.delivery)
            return due

    def caught_up(self) -> bool:
        """Messages were shed and memory is half free again: time to get them back."""
        with self._cond:
            return self.shed_messages > 0 and self.nbytes <= self.max_bytes // 2

    def reconnected(self) -> int:
        """A new connection: the broker resends what was shed; returns how many."""
        with self._cond:
            shed, self.shed_messages = self.shed_messages, 0
            return shed

    def close(self) -> None:
        """Take no more messages; ``take`` hands out what is queued without lingering."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def held(self) -> tuple[int, int]:
        """(rows, bytes) held, for the metrics."""
        with self._cond:
            return sum(p.rows for p in self._queue), self.nbytes


try:  # the collector extra: a third of the standard library's decoding time
    import orjson
except ImportError:  # pragma: no cover - payloads.decode then
    orjson = None  # type: ignore[assignment]


# orjson reads an integer past 64 bits as a float (losing digits) where the standard
# library keeps it exact: a payload with such a run of digits takes the standard path.
_LONG_NUMBER = re.compile(rb"\d{19,}")


def _decode(payload: bytes, where: str) -> Any:
    """``payloads.decode``, through orjson when installed. What orjson refuses (NaN,
    bad JSON) or would read differently (integers past 64 bits) goes to
    ``payloads.decode``, which takes what the standard library takes and names the
    problem otherwise."""
    if orjson is not None and not _LONG_NUMBER.search(payload):
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(obj, dict):
                return obj
    return payloads.decode(payload, where)
