"""Drift summaries: live inputs and outputs binned against the manifest's reference
profile, scored with PSI (``agent/wire/profile.py``), off the request path.

The inference core hands every answered batch to ``offer``: a length check and a
deque append, never a lock, never numpy. A background loop drains the queue, stacks
the batches of each model and bins them in one pass per feature. When the queue is
full (the loop is behind, the device busy) a batch is skipped and counted: a drift
summary is a sample, and serving comes first.

Live counts are kept per model version since it was first seen; past
``drift.window_rows`` rows they are halved, so the score follows the recent traffic
with the old rows weighing less and less (an exponential window, no row store).
Memory: ``len(features) * (bins + 1)`` float64 per version, about 1 KiB for 12
features.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.config import DriftConfig
from agent.loops import Loop
from agent.wire import payloads
from agent.wire.profile import Profile, bin_counts, class_counts, psi

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.models.runtime import LoadedModel

log = logging.getLogger(__name__)

DRAIN_INTERVAL_S = 0.5
# Batches binned together at most: one stack per input, then one pass per feature.
DRAIN_BATCHES = 512


@dataclass(frozen=True)
class FeatureScore:
    name: str
    psi: float
    live: list[float]


class LiveProfile:
    """Live bin counts of one model version against its reference profile."""

    def __init__(self, name: str, version: str, profile: Profile, window_rows: int) -> None:
        self.name, self.version, self.profile = name, version, profile
        self.window_rows = window_rows
        self.counts = [np.zeros(f.edges.size + 1) for f in profile.features]
        out = profile.output
        self.output_counts: np.ndarray | None = None
        self.output_reference: np.ndarray | None = None
        if out is not None:
            if out.classes is not None:
                # One more bucket for labels the training sample never had.
                self.output_reference = np.append(out.fractions, 0.0)
                self.output_counts = np.zeros(len(out.classes) + 1)
            else:
                self.output_reference = out.fractions
                self.output_counts = np.zeros(out.fractions.size)
        self.rows = 0.0  # effective rows: halved with the counts
        self.seen = 0  # every row binned since the version was first seen

    def add(self, inputs: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> None:
        """Bin a list of batches: stacked per input, one pass per feature."""
        stacked: dict[str, np.ndarray] = {}
        for i, feature in enumerate(self.profile.features):
            arr = stacked.get(feature.input)
            if arr is None:
                parts = [b[feature.input] for b in inputs if feature.input in b]
                if not parts:
                    continue
                arr = stacked[feature.input] = np.concatenate(parts, axis=0)
            column = arr[:, feature.column] if arr.ndim == 2 else arr.reshape(-1)
            self.counts[i] += bin_counts(feature.edges, column)
        rows = int(next(iter(stacked.values())).shape[0]) if stacked else 0
        out = self.profile.output
        if out is not None and outputs and self.output_counts is not None:
            values = np.concatenate([np.asarray(o).reshape(-1) for o in outputs])
            rows = rows or int(values.size)
            if out.classes is not None:
                self.output_counts += class_counts(out.classes, values)
            elif out.edges is not None:
                self.output_counts += bin_counts(out.edges, values)
        self.rows += rows
        self.seen += rows
        if self.rows > self.window_rows:
            self.counts = [c * 0.5 for c in self.counts]
            if self.output_counts is not None:
                self.output_counts *= 0.5
            self.rows *= 0.5

    def scores(self) -> list[FeatureScore]:
        """Every feature's PSI, the most drifted first."""
        found = []
        for feature, counts in zip(self.profile.features, self.counts, strict=True):
            total = float(counts.sum())
            live = [round(float(c) / total, 3) if total else 0.0 for c in counts]
            found.append(FeatureScore(feature.name, round(psi(counts, feature.fractions), 4), live))
        found.sort(key=lambda s: s.psi, reverse=True)
        return found

    def output_psi(self) -> float | None:
        if self.output_counts is None or self.output_reference is None:
            return None
        return round(psi(self.output_counts, self.output_reference), 4)


_Item = tuple["LoadedModel", dict[str, np.ndarray], np.ndarray | None]


class DriftMonitor:
    """The queue, the loop that drains it, and the live profiles it fills."""

    def __init__(self, cfg: DriftConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self._queue: collections.deque[_Item] = collections.deque()
        self._limit = cfg.queue_batches
        self._lock = threading.Lock()  # the profiles, between the loop and the reports
        self._profiles: dict[tuple[str, str], LiveProfile] = {}
        self.skipped = 0  # batches not binned: the queue was full
        self.loop = Loop("drift", self._step, stall_s=60.0, first_wait_s=DRAIN_INTERVAL_S)
        if metrics is not None:
            metrics.registry.register(DriftCollector(self))

    # --- the request path: no lock, no numpy -------------------------------------------

    def offer(self, model: LoadedModel, inputs: dict[str, np.ndarray],
              outputs: dict[str, np.ndarray]) -> None:  # fmt: skip
        """Queue an answered batch of a model that has a profile; skip it when full."""
        profile = model.manifest.profile
        if profile is None:
            return
        if len(self._queue) >= self._limit:
            self.skipped += 1  # a lost increment under a race is fine: it is a gauge of load
            return
        out = profile.output
        self._queue.append((model, inputs, None if out is None else outputs.get(out.name)))

    # --- the loop ----------------------------------------------------------------------

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(5)

    def alive(self) -> bool:
        return self.loop.alive()

    def _step(self) -> float:
        self.drain()
        return DRAIN_INTERVAL_S if not self._queue else 0.0

    def drain(self) -> int:
        """Bin what is queued (at most DRAIN_BATCHES batches); return how many."""
        grouped: dict[tuple[str, str], tuple[LoadedModel, list[Any], list[Any]]] = {}
        taken = 0
        while taken < DRAIN_BATCHES:
            try:
                item = self._queue.popleft()
            except IndexError:
                break
            taken += 1
            entry = grouped.setdefault((item[0].name, item[0].version), (item[0], [], []))
            entry[1].append(item[1])
            if item[2] is not None:
                entry[2].append(item[2])
        for key, (model, batches, outputs) in grouped.items():
            with self._lock:
                live = self._profiles.get(key)
                if live is None:
                    profile = model.manifest.profile
                    assert profile is not None  # offer queued only models with one
                    live = LiveProfile(model.name, model.version, profile, self.cfg.window_rows)
                    self._profiles[key] = live
                    # One live profile per model: a new version starts from nothing.
                    for old in [k for k in self._profiles if k[0] == key[0] and k != key]:
                        del self._profiles[old]
                live.add(batches, outputs)
        return taken

    # --- reports -----------------------------------------------------------------------

    def profiles(self) -> list[LiveProfile]:
        with self._lock:
            return list(self._profiles.values())

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Per model the health ``drift`` section, all models within ``report_bytes``."""
        lives = self.profiles()
        if not lives:
            return {}
        share = self.cfg.report_bytes // len(lives)
        out: dict[str, dict[str, Any]] = {}
        for live in lives:
            with self._lock:
                ready = live.seen >= self.cfg.min_rows
                scores = live.scores() if ready else []
                output = live.output_psi() if ready else None
                rows = int(live.rows)
            out[live.name] = payloads.drift_summary(
                live.version, rows, [(s.name, s.psi, s.live) for s in scores], output,
                top_k=self.cfg.top_k, budget=share,
            )  # fmt: skip
        return out


class DriftCollector(Collector):
    """Every feature's PSI on the device's own /metrics (no byte budget there)."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterable[Any]:
        labels = ["model", "version"]
        feature = GaugeMetricFamily("edge_model_drift_psi",
                                    "PSI of a feature's live values against the training sample",
                                    labels=[*labels, "feature"])  # fmt: skip
        score = GaugeMetricFamily("edge_model_drift_score",
                                  "The largest feature PSI of the model version",
                                  labels=labels)  # fmt: skip
        output = GaugeMetricFamily("edge_model_output_drift_psi",
                                   "PSI of the live predictions against the training sample's",
                                   labels=labels)  # fmt: skip
        rows = GaugeMetricFamily("edge_model_drift_rows",
                                 "Live rows the drift scores weigh (halved past the window)",
                                 labels=labels)  # fmt: skip
        for live in self.monitor.profiles():
            key = [live.name, live.version]
            with self.monitor._lock:
                scores, out, n = live.scores(), live.output_psi(), live.rows
            rows.add_metric(key, n)
            if live.seen < self.monitor.cfg.min_rows:
                continue
            for s in scores:
                feature.add_metric([*key, s.name], s.psi)
            if scores:
                score.add_metric(key, scores[0].psi)
            if out is not None:
                output.add_metric(key, out)
        skipped = CounterMetricFamily("edge_drift_skipped_batches",
                                      "Answered batches not binned: the drift queue was full",
                                      value=self.monitor.skipped)  # fmt: skip
        yield from (feature, score, output, rows, skipped)
