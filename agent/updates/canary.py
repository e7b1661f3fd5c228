"""Probation of a traffic split: the canary arm against the active arm, on the same traffic.

A version published with ``--canary-traffic P`` serves P% of its model's requests
beside the active version (the split itself is ``InferenceCore.route``). Both arms run
at once, so the baseline is not the previous version's past figures, as in
``agent/updates/probation.py``, but the active arm's figures over the same seconds.
Every second the judge adds both arms' inference windows since the split began and
applies probation's own ``decide``: once the canary ran ``probation_min_requests``, an
error rate more than ``probation_max_error_rate`` above the active arm's, or a p99 more
than ``probation_max_latency_ratio`` times the active arm's, drops the canary (the
active version serves everything again). The judgement lasts as long as the split.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge

from agent.config import ModelsConfig
from agent.loops import Loop
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.updates.probation import Limits, Totals, decide
from agent.wire.canary import canary_arm, canary_summary

log = logging.getLogger(__name__)
TICK_S = 1.0

Dropped = Callable[[str, str, str], None]  # (model, canary version, reason)


@dataclass
class Split:
    name: str
    version: str  # the canary
    against: str  # the active version
    traffic: float
    active: Totals = field(default_factory=Totals)
    canary: Totals = field(default_factory=Totals)


class CanaryJudge:
    """Keeps both arms' figures of every split in the registry; calls ``on_drop``."""

    def __init__(
        self, cfg: ModelsConfig, metrics: Metrics, registry: Registry, on_drop: Dropped
    ) -> None:
        self.limits = Limits.from_config(cfg)
        self.stats = metrics.inference
        self.registry = registry
        self.on_drop = on_drop
        self._window = self.stats.subscribe()
        self._lock = threading.Lock()
        self._splits: dict[str, Split] = {}
        labels = ["model", "version", "arm"]
        reg = metrics.registry
        self._requests = Gauge("edge_canary_requests", "Requests each arm of a traffic split "
                               "ran since the split began", labels, registry=reg)  # fmt: skip
        self._errors = Gauge("edge_canary_errors", "The model's failures in each arm of a "
                             "traffic split since it began", labels, registry=reg)  # fmt: skip
        self._p99 = Gauge("edge_canary_p99_seconds", "p99 latency of each arm of a traffic "
                          "split since it began", labels, registry=reg)  # fmt: skip
        self._traffic = Gauge("edge_canary_traffic_percent", "Percent of a model's requests "
                              "the canary serves", ["model", "version"], registry=reg)  # fmt: skip
        self.loop = Loop("canary", self._step, stall_s=60.0, first_wait_s=TICK_S)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(5)
        self.stats.unsubscribe(self._window)

    def alive(self) -> bool:
        return self.loop.alive()

    def _step(self) -> float:
        self.tick()
        return TICK_S

    def tick(self) -> None:
        """Follow the registry's splits, add this second's figures, judge each split."""
        windows = self._window.take()
        verdicts: list[tuple[Split, str]] = []
        with self._lock:
            current: dict[str, Split] = {}
            for name in self.registry.names():
                held = self.registry.canary(name)
                active = self.registry.loaded(name)
                if held is None or active is None:
                    continue
                split = self._splits.get(name)
                if split is None or (split.version, split.against) != (
                    held[0].version,
                    active.version,
                ):
                    split = Split(name, held[0].version, active.version, held[1])
                current[name] = split
                for totals, version in ((split.active, split.against),
                                        (split.canary, split.version)):  # fmt: skip
                    w = windows.get((name, version))
                    if w is not None:
                        totals.add(w)
                reason = decide(split.canary, split.active, self.limits)
                if reason is not None:
                    verdicts.append((split, reason))
                    del current[name]
            gone = set(self._splits) - set(current)
            self._splits = current
        self._export(gone)
        for split, reason in verdicts:  # outside the lock: the callback publishes
            log.warning("canary: %s %s dropped: %s", split.name, split.version, reason)
            self.on_drop(split.name, split.version, f"canary arm: {reason}")

    def summary(self, name: str) -> dict[str, Any] | None:
        """The health/status section of ``name``'s split (agent/wire/canary.py), or None."""
        split = self._splits.get(name)
        if split is None:
            return None
        arms = [canary_arm(v, t.count, t.errors, t.p99_ms)
                for v, t in ((split.against, split.active), (split.version, split.canary))]  # fmt: skip
        return canary_summary(version=split.version, against=split.against,
                              traffic=split.traffic, active=arms[0], canary=arms[1])  # fmt: skip

    def _export(self, gone: set[str]) -> None:
        if gone:  # one series per arm of a live split: bounded by the models' number
            for gauge in (self._requests, self._errors, self._p99, self._traffic):
                gauge.clear()
        for split in list(self._splits.values()):
            self._traffic.labels(split.name, split.version).set(split.traffic)
            for arm, version, t in (("active", split.against, split.active),
                                    ("canary", split.version, split.canary)):  # fmt: skip
                self._requests.labels(split.name, version, arm).set(t.count)
                self._errors.labels(split.name, version, arm).set(t.errors)
                if t.p99_ms is not None:
                    self._p99.labels(split.name, version, arm).set(t.p99_ms / 1000)
