"""Drain the result buffer to ``edge/devices/{id}/results``: in order, QoS 1, at least once.

A batch of rows goes out as one message. With ``forward.ack = "collector"`` (the
default) its rows are deleted only when a collector acknowledges, on
``edge/devices/{id}/results/ack``, that they are committed in the central database: a
PUBACK only says the broker has the message, and a broker with no subscriber drops it.
With ``forward.ack = "broker"`` the PUBACK is enough (for users who consume the results
topic themselves).

At most ``mqtt.max_inflight`` batches are unacknowledged at a time, so memory stays
bounded however large the backlog. While the connection is down nothing new is sent:
paho resends the batches awaiting a PUBACK after the reconnect. A batch the broker
refuses, one no collector acknowledges within ``forward.ack_timeout_s``, or one lost
with the process (kill -9) is read again from SQLite and sent again. Duplicates are
possible by design; every row carries the device's increasing ``seq`` and the collector
stores each (device, seq) once, acknowledging it again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from agent.config import Config
from agent.loops import Loop
from agent.wire import payloads

if TYPE_CHECKING:
    from agent.link import Link, Message, PublishHandle
    from agent.metrics import Metrics
    from agent.results.buffer import BufferedRow, ResultBuffer

log = logging.getLogger(__name__)

# A results message stays below this even when rows are large (the broker's limit is
# 4 MiB, see broker-config/mosquitto.conf); a batch is split where it would pass it.
MAX_MESSAGE_BYTES = 1024 * 1024
# How soon a new result goes out once the backlog is drained. Also the linger after a
# short batch: under steady traffic results go out a few times a second in full-ish
# batches, not one transaction and one message per handful of requests.
_IDLE_POLL_S = 0.25
_RETRY_MIN_S = 1.0  # after a refused batch, back off before resending
_RETRY_MAX_S = 60.0
_ALIVE_WINDOW_S = 30.0
# Share of one core the forwarding thread may use while it drains a backlog. Serving
# comes first: a device that was offline for hours must not answer /predict slower
# while it catches up. The drain rate follows from the hardware: results/s = share /
# (CPU seconds per result), about 22,000/s on a desktop core at 6% (bench/forward.py);
# 8% slowed /predict by 14% there, 6% by under 10%, the goal.
CPU_SHARE = 0.06
_MIN_PAUSE_S = 0.005
_RATE_WINDOW_S = 10.0


# After an ack timeout the next wait for an ack doubles, up to ten times the configured
# timeout and at most this: a device whose collector is down for a day resends its
# window a few times an hour, not every minute, and picks up soon after it returns.
_ACK_TIMEOUT_MAX_S = 600.0
_ACK_BACKOFF_FACTOR = 10


@dataclass
class _Flight:
    """One unacknowledged batch: the rows ``first``..``last`` read after ``after``."""

    handle: PublishHandle
    after: int
    first: int
    last: int
    count: int
    puback_at: float | None = None  # collector mode: when the broker had it


class Forwarder:
    """The buffer -> MQTT pump; one named thread."""

    def __init__(
        self,
        cfg: Config,
        buffer: ResultBuffer,
        mqtt: Link,
        metrics: Metrics | None = None,
        *,
        cpu_share: float | None = None,
    ) -> None:
        self.buffer = buffer
        self.mqtt = mqtt
        self.batch_size = cfg.buffer.batch_size
        self.max_inflight = cfg.mqtt.max_inflight
        self.device = cfg.device.id
        self.topic = mqtt.topics.results(cfg.device.id)
        self.ack_topic = mqtt.topics.results_ack(cfg.device.id)
        self.by_collector = cfg.forward.ack == "collector"
        self.ack_timeout_s = cfg.forward.ack_timeout_s
        self._ack_wait_s = self.ack_timeout_s
        self.cpu_share = cfg.forward.cpu_share if cpu_share is None else cpu_share
        self._debt = 0.0  # seconds to pause so the thread stays within its CPU share
        self._head = payloads.results_head(cfg.device.id)
        # A PUBACK or a (re)connect wakes the loop: look again at once.
        self.loop = Loop(
            "forwarder", self._cycle, stall_s=_ALIVE_WINDOW_S, on_stop=self._drain_on_stop
        )
        self._inflight: deque[_Flight] = deque()
        self._after = 0  # highest seq sent and not known lost
        self._backoff = 0.0  # grows while batches keep failing, reset by a success
        self._retry_at = 0.0
        self._linger_until = 0.0
        self.forwarded = 0
        self.failed_batches = 0
        self.ack_timeouts = 0
        self.invalid_acks = 0
        self._rate: deque[tuple[float, int]] = deque()  # (time, forwarded) samples
        # Acks arrive on the MQTT thread; the forwarder's thread deletes (one writer).
        self._acks: deque[list[tuple[int, int]]] = deque()
        self._sent_max = 0  # highest seq ever sent: an ack above it is not believed
        self._reconnected = False
        mqtt.add_connection_listener(self._on_connection)

        self._m_forwarded: Counter | None = None
        self._m_failed: Counter | None = None
        self._m_ack_timeouts: Counter | None = None
        if metrics is not None:
            reg = metrics.registry
            self._m_forwarded = Counter(
                "edge_forwarded_results",
                "Results acknowledged (by the collector, or the broker with forward.ack=broker)",
                registry=reg,
            )
            Gauge(
                "edge_forward_rate", "Results forwarded per second, last 10 s", registry=reg
            ).set_function(self.rate)
            Gauge(
                "edge_forward_inflight_batches",
                "Result batches sent and not yet acknowledged",
                registry=reg,
            ).set_function(lambda: len(self._inflight))
            self._m_ack_timeouts = Counter(
                "edge_forward_ack_timeouts",
                "Times no collector acknowledged within forward.ack_timeout_s (then sent again)",
                registry=reg,
            )
            self._m_failed = Counter(
                "edge_forward_failed_batches",
                "Result batches refused or lost and sent again",
                registry=reg,
            )

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self.by_collector:
            self.mqtt.subscribe(self.ack_topic, 1, self._on_ack)
        log.info(
            "forwarder: started, results to %s, deleted on the %s's ack", self.topic,
            "collector" if self.by_collector else "broker",
        )  # fmt: skip
        self.loop.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending; wait briefly for outstanding PUBACKs so their rows are deleted."""
        self.loop.stop(timeout)

    def alive(self) -> bool:
        return self.loop.alive()

    def rate(self) -> float:
        """Results acknowledged per second over the last few seconds."""
        samples = list(self._rate)
        if len(samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    # --- the loop --------------------------------------------------------------------

    def _cycle(self) -> float:
        """One step, then the duty-cycle pause that keeps forwarding within its CPU share."""
        cpu = time.thread_time()
        wait = self._step()
        if wait > 0:
            self._debt = 0.0
            return wait
        # Duty cycle: pause (cost / share - cost) after each batch sent; a PUBACK does
        # not cut this pause short, only a stop does.
        if self.cpu_share < 1:
            cost = time.thread_time() - cpu
            self._debt += cost * (1 / self.cpu_share - 1)
            if self._debt >= _MIN_PAUSE_S:
                self.loop.pause(self._debt)
                self._debt = 0.0
        return 0.0

    def _step(self) -> float:
        """Settle finished batches, send more; return how long to sleep (0: go on)."""
        self._settle()
        delay = self._retry_at - time.monotonic()
        if delay > 0:
            return delay
        if not self.mqtt.connected:
            return 1.0
        if len(self._inflight) >= self.max_inflight:
            return 1.0  # woken by the next PUBACK or ack
        # After a short batch, let results gather (PUBACKs wake the loop only to settle).
        linger = self._linger_until - time.monotonic()
        if linger > 0:
            return linger
        self.buffer.retry_deletes()
        batch = self.buffer.take_batch_json(self.batch_size, after=self._after)
        if batch is None:
            return _IDLE_POLL_S
        payload = self._head + batch.json.encode() + payloads.RESULTS_TAIL
        if len(payload) > MAX_MESSAGE_BYTES:
            self._send_rows(self.buffer.take_batch(self.batch_size, after=self._after))
            return 0.0
        self._publish(payload, batch.first, batch.last, batch.count)
        if batch.count >= self.batch_size:
            return 0.0
        self._linger_until = time.monotonic() + _IDLE_POLL_S
        return _IDLE_POLL_S

    def _send_rows(self, rows: list[BufferedRow]) -> None:
        """Large rows: as many as fit in one message, the rest in the next."""
        parts: list[bytes] = []
        size = len(self._head) + 2
        for row in rows:
            part = row.to_json().encode()
            if parts and size + len(part) + 1 > MAX_MESSAGE_BYTES:
                break
            parts.append(part)
            size += len(part) + 1
        payload = self._head + b",".join(parts) + payloads.RESULTS_TAIL
        self._publish(payload, rows[0].seq, rows[len(parts) - 1].seq, len(parts))

    def _publish(self, payload: bytes, first: int, last: int, count: int) -> None:
        handle = self.mqtt.publish(self.topic, payload, qos=1)
        handle.add_done_callback(lambda h: self.loop.wake())
        self._inflight.append(_Flight(handle, self._after, first, last, count))
        self._after = last
        self._sent_max = max(self._sent_max, last)

    # --- acknowledgements --------------------------------------------------------------

    def _on_ack(self, msg: Message) -> None:
        """An ack from a collector (MQTT thread): queue its ranges for the loop."""
        try:
            ack = payloads.check_ack(payloads.decode(msg.payload, msg.topic), msg.topic)
            if ack["device"] != self.device:
                raise payloads.InvalidPayload(
                    f"{msg.topic}: device: {ack['device']!r} is not this device"
                )
        except payloads.InvalidPayload as e:
            self.invalid_acks += 1
            log.warning("forwarder: ack ignored: %s", e)
            return
        self._acks.append(payloads.ack_ranges(ack))
        self.loop.wake()

    def _on_connection(self, up: bool) -> None:
        if up and self.by_collector:
            # Acks published while the link was down are lost (the device's session is
            # clean): batches the broker had are sent again at once, not after a timeout.
            self._reconnected = True
        self.loop.wake()

    def _take_acks(self) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        while self._acks:
            for first, last in self._acks.popleft():
                if last > self._sent_max:
                    # Rows above what was ever sent cannot be stored centrally: deleting
                    # them would lose them. A confused collector changes nothing here.
                    self.invalid_acks += 1
                    log.warning(
                        "forwarder: ack for seq %d..%d ignored: only up to %d was sent",
                        first, last, self._sent_max,
                    )  # fmt: skip
                    continue
                ranges.append((first, last))
        return ranges

    # --- settling ------------------------------------------------------------------------

    def _settle(self) -> None:
        """Delete acknowledged rows; on a refusal or a missing ack, rewind and resend."""
        now = time.monotonic()
        acked: list[_Flight] = []
        failed: _Flight | None = None
        for flight in list(self._inflight):
            if flight.puback_at is not None or not flight.handle.done():
                continue
            if not flight.handle.ok:
                self._inflight.remove(flight)
                failed = failed or flight
            elif self.by_collector:
                flight.puback_at = now
            else:
                self._inflight.remove(flight)
                acked.append(flight)
        if self.by_collector:
            ranges = self._take_acks()
            if ranges:
                acked = self._covered(ranges)
                self.buffer.mark_sent_ranges(ranges)
                self._count(acked)
                self._ack_wait_s = self.ack_timeout_s
        elif acked:
            self._delete(acked)
        self._rate.append((now, self.forwarded))
        while len(self._rate) > 2 and now - self._rate[0][0] > _RATE_WINDOW_S:
            self._rate.popleft()
        if failed is not None:
            self.failed_batches += 1
            if self._m_failed is not None:
                self._m_failed.inc()
            log.warning(
                "forwarder: batch seq %d..%d not accepted (%s); will resend",
                failed.first, failed.last, failed.handle.error,
            )  # fmt: skip
            self._rewind(now, backoff=True)
        elif self.by_collector and self._unacked_too_long(now):
            self._rewind(now, backoff=False)
        elif acked:
            self._backoff = 0.0

    def _unacked_too_long(self, now: float) -> bool:
        """Whether the collector missed a batch: a reconnect, or no ack in time."""
        waiting = [f for f in self._inflight if f.puback_at is not None]
        if not waiting:
            self._reconnected = False
            return False
        if self._reconnected:
            self._reconnected = False
            log.info("forwarder: reconnected; resending %d unacknowledged batches", len(waiting))
            return True
        oldest = min(f.puback_at or now for f in waiting)
        if now - oldest < self._ack_wait_s:
            return False
        self.ack_timeouts += 1
        if self._m_ack_timeouts is not None:
            self._m_ack_timeouts.inc()
        log.warning(
            "forwarder: no collector acknowledged seq %d..%d within %.0f s; will resend"
            " (is `edge-fleet collect` running? forward.ack = \"broker\" deletes on PUBACK)",
            waiting[0].first, waiting[-1].last, self._ack_wait_s,
        )  # fmt: skip
        cap = min(_ACK_TIMEOUT_MAX_S, self.ack_timeout_s * _ACK_BACKOFF_FACTOR)
        self._ack_wait_s = min(max(cap, self.ack_timeout_s), self._ack_wait_s * 2)
        return True

    def _rewind(self, now: float, *, backoff: bool) -> None:
        """Resend from the oldest row; whatever is already deleted is not read again.

        Rows of later batches may be acknowledged or not, so the whole window goes.
        """
        self._inflight.clear()
        self._after = 0
        if backoff:
            self._backoff = min(_RETRY_MAX_S, max(_RETRY_MIN_S, self._backoff * 2))
            self._retry_at = now + self._backoff

    def _covered(self, ranges: list[tuple[int, int]]) -> list[_Flight]:
        """The flights inside the acked ranges, removed from the window."""
        done = [f for f in self._inflight if any(a <= f.first and f.last <= b for a, b in ranges)]
        for flight in done:
            self._inflight.remove(flight)
        return done

    def _delete(self, acked: list[_Flight]) -> None:
        """Delete acknowledged batches, one range per run of consecutive batches.

        A batch holds every row between its first and last seq: rows are committed in
        seq order, so none can appear inside that range after it was read.
        """
        acked.sort(key=lambda f: f.first)
        ranges = [(acked[0].first, acked[0].last)]
        for flight in acked[1:]:
            if flight.after == ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], flight.last)
            else:
                ranges.append((flight.first, flight.last))
        self.buffer.mark_sent_ranges(ranges)
        self._count(acked)

    def _count(self, acked: list[_Flight]) -> None:
        count = sum(f.count for f in acked)
        self.forwarded += count
        if self._m_forwarded is not None and count:
            self._m_forwarded.inc(count)

    def _drain_on_stop(self, timeout: float = 2.0) -> None:
        """At stop, wait briefly for outstanding (PUB)ACKs so their rows are deleted now."""
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline and self.mqtt.connected:
            pending = [f for f in self._inflight if f.puback_at is None]
            if pending:
                pending[0].handle.wait(max(0.0, deadline - time.monotonic()))
            else:
                time.sleep(0.02)  # acks arrive on the MQTT thread
            self._settle()
