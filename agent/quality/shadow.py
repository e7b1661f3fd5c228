"""Shadow evaluation: a candidate installed with ``--shadow`` answers a sample of the live
requests beside the active version, off the request path, and the two are compared.

The inference core hands ``offer`` every answered batch: a dict read (is there a
candidate?), one random draw (``shadow.rate``), a length check and a deque append. The
``shadow`` loop runs the candidate on the queued batches and, after each, waits so that
the candidate never takes more than ``shadow.cpu_share`` of one core: with share ``s``, a
run of ``t`` seconds is followed by a pause of ``t * (1 - s) / s``. A full queue skips the
batch (counted): the comparison is a sample, serving comes first.

Compared per row, on the prediction output: for labels, agreement (same label) and the
confusion between active and candidate labels (the most frequent cells, bounded); for
numbers, the absolute difference (its quantiles over the last ``ERRORS_KEPT`` rows).
Latency of each arm per batch (the active one as the core timed it). Figures are kept
since the candidate was installed and start over when either version changes.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.config import ShadowConfig
from agent.loops import Loop
from agent.wire import payloads

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.models.registry import Registry
    from agent.models.runtime import LoadedModel

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.2
ERRORS_KEPT = 4096  # absolute differences of regressors, for the quantiles
LATENCIES_KEPT = 1024  # per arm, per batch
_NUMBERS = {"FP16", "FP32", "FP64"}


def _label(value: Any) -> str | int | float:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str | int | float) else str(value)


class Comparison:
    """The figures of one (active version, candidate version) pair of one model."""

    def __init__(self, active: LoadedModel, candidate: LoadedModel) -> None:
        self.name = active.name
        self.active_version, self.candidate_version = active.version, candidate.version
        output = candidate.manifest.prediction_output
        spec = candidate.outputs.get(output)
        self.labels = spec is None or spec.datatype not in _NUMBERS
        self.rows = 0
        self.agreed = 0
        self.confusion: collections.Counter[tuple[Any, Any]] = collections.Counter()
        self.errors: collections.deque[float] = collections.deque(maxlen=ERRORS_KEPT)
        self.latency: dict[str, collections.deque[float]] = {
            arm: collections.deque(maxlen=LATENCIES_KEPT) for arm in ("active", "candidate")
        }
        self.failed = 0

    def add(self, active: np.ndarray, candidate: np.ndarray) -> None:
        a, c = np.asarray(active).reshape(-1), np.asarray(candidate).reshape(-1)
        if a.size != c.size:
            self.failed += 1
            return
        self.rows += int(a.size)
        if self.labels:
            same = a == c
            self.agreed += int(np.count_nonzero(same))
            pairs = zip(a.tolist(), c.tolist(), strict=True)
            self.confusion.update((_label(x), _label(y)) for x, y in pairs)
        else:
            diff = np.abs(a.astype(np.float64) - c.astype(np.float64))
            self.errors.extend(diff.tolist())

    def section(self, cells: int, skipped: int) -> dict[str, Any]:
        """The health ``shadow`` section (bounded: ``cells`` confusion cells at most)."""
        confusion = None
        agreement = None
        if self.labels:
            agreement = round(self.agreed / self.rows, 4) if self.rows else None
            # Disagreements first (they are the news), then the most frequent.
            ranked = sorted(self.confusion.items(), key=lambda kv: (kv[0][0] == kv[0][1], -kv[1]))
            confusion = [[str(a)[:32], str(c)[:32], n] for (a, c), n in ranked[:cells]]
        error = None
        if not self.labels and self.errors:
            e = np.asarray(self.errors)
            error = {
                "mean": round(float(e.mean()), 6),
                "p50": round(float(np.quantile(e, 0.5)), 6),
                "p90": round(float(np.quantile(e, 0.9)), 6),
                "p99": round(float(np.quantile(e, 0.99)), 6),
                "max": round(float(e.max()), 6),
            }
        latency = {}
        for arm, values in self.latency.items():
            if values:
                v = np.asarray(values)
                latency[f"{arm}_p50"] = round(float(np.quantile(v, 0.5)), 3)
                latency[f"{arm}_p99"] = round(float(np.quantile(v, 0.99)), 3)
        return payloads.shadow_summary(
            candidate=self.candidate_version, against=self.active_version, compared=self.rows,
            agreement=agreement, confusion=confusion, error=error, latency_ms=latency,
            skipped=skipped, failed=self.failed,
        )  # fmt: skip


_Item = tuple["LoadedModel", "LoadedModel", dict[str, np.ndarray], np.ndarray, float]


class ShadowRunner:
    """The sample queue, the CPU-bounded loop that runs candidates, and the comparisons."""

    def __init__(
        self, cfg: ShadowConfig, registry: Registry, metrics: Metrics | None = None
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self._queue: collections.deque[_Item] = collections.deque()
        self._lock = threading.Lock()
        self._comparisons: dict[str, Comparison] = {}
        self._skipped: collections.Counter[str] = collections.Counter()
        self._random = random.Random()
        self.loop = Loop("shadow", self._step, stall_s=120.0, first_wait_s=IDLE_WAIT_S)
        if metrics is not None:
            metrics.registry.register(ShadowCollector(self))

    # --- the request path ------------------------------------------------------------

    def offer(self, model: LoadedModel, inputs: dict[str, np.ndarray],
              outputs: dict[str, np.ndarray], latency_s: float) -> None:  # fmt: skip
        """Queue a sampled answered batch of a model that has a shadow candidate."""
        candidate = self.registry.shadow(model.name)
        if candidate is None or self._random.random() >= self.cfg.rate:
            return
        answer = outputs.get(model.manifest.prediction_output)
        if answer is None:
            return  # the caller asked for other outputs only: nothing to compare
        if len(self._queue) >= self.cfg.queue_batches:
            self._skipped[model.name] += 1
            return
        self._queue.append((model, candidate, inputs, answer, latency_s))

    # --- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(5)

    def alive(self) -> bool:
        return self.loop.alive()

    def _step(self) -> float:
        spent = self.run_one()
        if spent is None:
            return IDLE_WAIT_S
        share = self.cfg.cpu_share
        return spent * (1 - share) / share

    def run_one(self) -> float | None:
        """Run the candidate on one queued batch and compare; the seconds it took, or None
        when nothing was queued."""
        try:
            active, candidate, inputs, answer, latency_s = self._queue.popleft()
        except IndexError:
            return None
        start = time.perf_counter()
        output = candidate.manifest.prediction_output
        try:
            result = candidate.run(inputs, [output])[output]
        except Exception as e:  # the candidate's failure is a figure, never the agent's
            result = None
            log.debug("shadow: %s %s failed: %s", candidate.name, candidate.version, e)
        ran = time.perf_counter() - start
        with self._lock:
            comparison = self._comparison(active, candidate)
            if result is None:
                comparison.failed += 1
            else:
                comparison.add(answer, result)
                comparison.latency["active"].append(latency_s * 1000)
                comparison.latency["candidate"].append(ran * 1000)
        # The share bounds all of the loop's work: the run and the comparison.
        return time.perf_counter() - start

    def _comparison(self, active: LoadedModel, candidate: LoadedModel) -> Comparison:
        c = self._comparisons.get(active.name)
        if c is None or (c.active_version, c.candidate_version) != (
            active.version,
            candidate.version,
        ):
            c = self._comparisons[active.name] = Comparison(active, candidate)
        return c

    def drain(self) -> int:
        """Run everything queued now, without the CPU pauses (tests, shutdown)."""
        n = 0
        while self.run_one() is not None:
            n += 1
        return n

    # --- reports -------------------------------------------------------------------------

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Per model with a candidate the health ``shadow`` section."""
        out = {}
        with self._lock:
            for name, c in self._comparisons.items():
                candidate = self.registry.shadow(name)
                if candidate is None or candidate.version != c.candidate_version:
                    continue  # promoted or replaced since: its figures are history
                out[name] = c.section(self.cfg.confusion_cells, self._skipped[name])
        return out


class ShadowCollector(Collector):
    """The comparisons on the agent's /metrics."""

    def __init__(self, runner: ShadowRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterable[Any]:
        labels = ["model", "version", "candidate"]
        rows = CounterMetricFamily("edge_shadow_compared_rows",
                                   "Rows answered by both the active version and the candidate",
                                   labels=labels)  # fmt: skip
        agreed = CounterMetricFamily("edge_shadow_agreed_rows",
                                     "Rows where the candidate gave the active version's label",
                                     labels=labels)  # fmt: skip
        agreement = GaugeMetricFamily("edge_shadow_agreement",
                                      "Share of compared rows with the same label", labels=labels)  # fmt: skip
        error = GaugeMetricFamily("edge_shadow_abs_error",
                                  "Absolute difference of the candidate's number (regressors)",
                                  labels=[*labels, "quantile"])  # fmt: skip
        latency = GaugeMetricFamily("edge_shadow_latency_ms", "Latency per batch of each arm",
                                    labels=[*labels, "arm", "quantile"])  # fmt: skip
        for name, s in self.runner.summaries().items():
            key = [name, s["against"], s["version"]]
            rows.add_metric(key, s["compared"])
            if s.get("agreement") is not None:
                agreement.add_metric(key, s["agreement"])
                agreed.add_metric(key, round(s["agreement"] * s["compared"]))
            for q, v in (s.get("error") or {}).items():
                if q.startswith("p"):
                    error.add_metric([*key, f"0.{q[1:]}"], v)
            for field, v in s["latency_ms"].items():
                arm, q = field.rsplit("_", 1)
                latency.add_metric([*key, arm, f"0.{q[1:]}"], v)
        yield from (rows, agreed, agreement, error, latency)
