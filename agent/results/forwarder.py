"""Drain the result buffer to ``edge/devices/{id}/results``: in order, QoS 1, at least once.

A batch of rows goes out as one message; its rows are deleted (``mark_sent_range``) only after
the broker's PUBACK for it. At most ``mqtt.max_inflight`` batches wait for a PUBACK at a
time, so memory stays bounded however large the backlog. While the connection is down
nothing new is sent: paho resends the unacknowledged batches after the reconnect, and
a batch the broker refuses, or that is lost with the process (kill -9), is read again
from SQLite and sent again. Duplicates are possible by design; every result carries the
device's increasing ``seq`` so consumers drop them.
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
    from agent.link import Link, PublishHandle
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


@dataclass
class _Flight:
    """One batch awaiting its PUBACK: the rows ``first``..``last`` read after ``after``."""

    handle: PublishHandle
    after: int
    first: int
    last: int
    count: int


class Forwarder:
    """The buffer -> MQTT pump; one named thread."""

    def __init__(
        self,
        cfg: Config,
        buffer: ResultBuffer,
        mqtt: Link,
        metrics: Metrics | None = None,
        *,
        cpu_share: float = CPU_SHARE,
    ) -> None:
        self.buffer = buffer
        self.mqtt = mqtt
        self.batch_size = cfg.buffer.batch_size
        self.max_inflight = cfg.mqtt.max_inflight
        self.topic = mqtt.topics.results(cfg.device.id)
        self.cpu_share = cpu_share
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
        self._rate: deque[tuple[float, int]] = deque()  # (time, forwarded) samples
        mqtt.add_connection_listener(lambda up: self.loop.wake())

        self._m_forwarded: Counter | None = None
        self._m_failed: Counter | None = None
        if metrics is not None:
            reg = metrics.registry
            self._m_forwarded = Counter(
                "edge_forwarded_results", "Results the broker acknowledged", registry=reg
            )
            Gauge(
                "edge_forward_rate", "Results forwarded per second, last 10 s", registry=reg
            ).set_function(self.rate)
            Gauge(
                "edge_forward_inflight_batches", "Result batches awaiting a PUBACK", registry=reg
            ).set_function(lambda: len(self._inflight))
            self._m_failed = Counter(
                "edge_forward_failed_batches",
                "Result batches refused or lost and sent again",
                registry=reg,
            )

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        log.info("forwarder: started, results to %s", self.topic)
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
            return 1.0  # woken by the next PUBACK
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

    def _settle(self) -> None:
        """Delete acknowledged rows; on a refusal, rewind to resend from the oldest row."""
        acked: list[_Flight] = []
        failed: _Flight | None = None
        for flight in list(self._inflight):
            if not flight.handle.done():
                continue
            self._inflight.remove(flight)
            if flight.handle.ok:
                acked.append(flight)
            elif failed is None:
                failed = flight
        if acked:
            self._delete(acked)
        now = time.monotonic()
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
            # Rows of later batches may be acknowledged or not: rewind to the start of
            # the backlog; whatever is already deleted is not read again.
            self._inflight.clear()
            self._after = 0
            self._backoff = min(_RETRY_MAX_S, max(_RETRY_MIN_S, self._backoff * 2))
            self._retry_at = now + self._backoff
        elif acked:
            self._backoff = 0.0

    def _delete(self, acked: list[_Flight]) -> None:
        """Delete acknowledged batches, one range per run of consecutive batches.

        A batch holds every row between its first and last seq: rows are committed in
        seq order, so none can appear inside that range after it was read.
        """
        acked.sort(key=lambda f: f.first)
        first, last = acked[0].first, acked[0].last
        for flight in acked[1:]:
            if flight.after == last:
                last = flight.last
            else:
                self.buffer.mark_sent_range(first, last)
                first, last = flight.first, flight.last
        self.buffer.mark_sent_range(first, last)
        count = sum(f.count for f in acked)
        self.forwarded += count
        if self._m_forwarded is not None:
            self._m_forwarded.inc(count)

    def _drain_on_stop(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline and self.mqtt.connected:
            self._inflight[0].handle.wait(max(0.0, deadline - time.monotonic()))
            self._settle()
