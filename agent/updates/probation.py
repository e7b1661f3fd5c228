"""Probation: a newly activated version is watched against the one it replaced.

Probation keeps its own inference window (health has another) and reads it once a
second. Figures of each (model, version) are kept for the last ``probation_s`` so that,
when a new version is activated, the previous version's recent figures are the
baseline. For ``probation_s`` after the activation the new version's figures are
compared with it: once it has ``probation_min_requests`` requests the model ran (a
caller's refused request, a 4xx, is neither a request nor an error here: a client
sending bad rows says nothing about the model), an error rate more
than ``probation_max_error_rate`` above the baseline's, or a p99 latency more than
``probation_max_latency_ratio`` times the baseline's, rolls the model back by itself.

``decide`` is the whole judgement, from numbers only; ``Probation`` feeds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import ModelsConfig
from agent.loops import Loop
from agent.metrics import InferenceStats, WindowStats

log = logging.getLogger(__name__)
TICK_S = 1.0


@dataclass
class Totals:
    """Figures summed over several windows: inferences, the model's failures among them,
    p99 weighted by count; callers' refused requests are kept apart and never judged."""

    count: int = 0
    errors: int = 0
    bad_requests: int = 0
    _p99_weighted: float = 0.0
    _p99_count: int = 0

    def add(self, w: WindowStats) -> None:
        self.count += w.count
        self.errors += w.errors
        self.bad_requests += w.bad_requests
        ok = w.count - w.errors
        if w.p99_ms is not None and ok > 0:
            # Windows are one second: a count-weighted mean of their p99s is close to
            # the p99 of the whole, without keeping every sample.
            self._p99_weighted += w.p99_ms * ok
            self._p99_count += ok

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def p99_ms(self) -> float | None:
        return self._p99_weighted / self._p99_count if self._p99_count else None


@dataclass(frozen=True)
class Limits:
    min_requests: int
    max_error_rate: float
    max_latency_ratio: float

    @classmethod
    def from_config(cls, m: ModelsConfig) -> Limits:
        return cls(
            m.probation_min_requests, m.probation_max_error_rate, m.probation_max_latency_ratio
        )


def decide(new: Totals, baseline: Totals | None, limits: Limits) -> str | None:
    """The reason to roll back, or None while the new version holds up."""
    if new.count < max(1, limits.min_requests):
        return None
    base_rate = baseline.error_rate if baseline is not None and baseline.count else 0.0
    if new.error_rate - base_rate > limits.max_error_rate:
        return (
            f"error rate {new.error_rate:.1%} over {new.count} requests "
            f"(previous version {base_rate:.1%}, limit +{limits.max_error_rate:.1%})"
        )
    if baseline is None or baseline.p99_ms is None or new.p99_ms is None:
        return None
    if baseline.count - baseline.errors < limits.min_requests:
        return None  # too few baseline samples to judge latency by
    ratio = new.p99_ms / max(baseline.p99_ms, 1e-6)
    if ratio > limits.max_latency_ratio:
        return (
            f"p99 latency {new.p99_ms:.2f} ms is {ratio:.1f}x the previous version's "
            f"{baseline.p99_ms:.2f} ms (limit {limits.max_latency_ratio:g}x)"
        )
    return None


@dataclass
class Trial:
    """One model on probation."""

    name: str
    version: str
    previous: str
    until: float
    baseline: Totals | None
    figures: Totals = field(default_factory=Totals)


Rollback = Callable[[str, str, str], None]  # (model, version, reason)
Passed = Callable[[str, str], None]  # (model, version)


class Probation:
    """Watches versions on probation; calls ``on_rollback`` when one regresses."""

    def __init__(
        self,
        cfg: ModelsConfig,
        stats: InferenceStats,
        on_rollback: Rollback,
        on_passed: Passed | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.limits = Limits.from_config(cfg)
        self.stats = stats
        self.on_rollback = on_rollback
        self.on_passed = on_passed
        self.clock = clock
        self._window = stats.subscribe()
        self._lock = threading.Lock()
        self._history: dict[tuple[str, str], deque[tuple[float, WindowStats]]] = {}
        self._trials: dict[str, Trial] = {}
        # A rollback loads a model: give a tick a minute before calling the loop hung.
        self.loop = Loop("probation", self._step, stall_s=60.0, first_wait_s=TICK_S)

    # --- lifecycle -------------------------------------------------------------------

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

    # --- trials ----------------------------------------------------------------------

    def begin(self, name: str, version: str, previous: str) -> None:
        """Put ``name`` ``version`` on probation against ``previous``'s recent figures."""
        if self.cfg.probation_s <= 0:
            return
        self.tick()  # the previous version's last second belongs to its baseline
        with self._lock:
            baseline = Totals()
            for _, w in self._history.get((name, previous), ()):
                baseline.add(w)
            self._trials[name] = Trial(
                name, version, previous, self.clock() + self.cfg.probation_s,
                baseline if baseline.count else None,
            )  # fmt: skip
        log.info("probation: %s %s for %.0f s against %s", name, version, self.cfg.probation_s,
                 previous)  # fmt: skip

    def end(self, name: str) -> None:
        with self._lock:
            self._trials.pop(name, None)

    def on_trial(self, name: str) -> Trial | None:
        return self._trials.get(name)

    def tick(self) -> None:
        """Read the window, keep the recent figures, judge every trial."""
        now = self.clock()
        verdicts: list[tuple[Trial, str | None]] = []
        with self._lock:
            horizon = now - max(self.cfg.probation_s, 60.0)
            for key, w in self._window.take().items():
                self._history.setdefault(key, deque()).append((now, w))
                trial = self._trials.get(key[0])
                if trial is not None and trial.version == key[1]:
                    trial.figures.add(w)
            for key, series in list(self._history.items()):
                while series and series[0][0] < horizon:
                    series.popleft()
                if not series:
                    del self._history[key]
            for name, trial in list(self._trials.items()):
                reason = decide(trial.figures, trial.baseline, self.limits)
                if reason is not None or now >= trial.until:
                    del self._trials[name]
                    verdicts.append((trial, reason))
        # Outside the lock: a rollback loads a model, which takes a while.
        for trial, reason in verdicts:
            if reason is not None:
                log.warning("probation: %s %s failed: %s", trial.name, trial.version, reason)
                self.on_rollback(trial.name, trial.version, reason)
            else:
                log.info("probation: %s %s passed (%d requests, %d errors)", trial.name,
                         trial.version, trial.figures.count, trial.figures.errors)  # fmt: skip
                if self.on_passed is not None:
                    self.on_passed(trial.name, trial.version)
