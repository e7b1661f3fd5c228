"""The one inference core under both protocols: look up, run, time, record, buffer.

``/predict`` (``agent/serving/predict.py``) and the Open Inference Protocol
(``agent/serving/oip.py``) are codecs: each turns its request into a ``Call`` and the
model's output tensors into its answer. Everything between (which model serves, the
clock, the inference statistics that health and probation read, the durable result)
happens here, once, so the two protocols cannot drift apart.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from agent.metrics import InferenceStats
from agent.models.registry import Registry
from agent.models.runtime import LoadedModel
from agent.quality.drift import DriftMonitor
from agent.quality.shadow import ShadowRunner
from agent.results.buffer import ResultBuffer
from agent.results.rows import Result
from agent.wire.canary import traffic_bucket
from agent.wire.errors import ModelFailed, ModelNotFound, NotReady

T = TypeVar("T")
Tensors = dict[str, np.ndarray]


# Plain slotted classes, not frozen dataclasses: built twice per request, and a frozen
# dataclass's __init__ costs a setattr call per field.
@dataclass(slots=True)
class Call:
    """A decoded request: the input tensors, the outputs wanted (None: all), and the
    inputs as the result buffer records them (the caller's own JSON where there is one)."""

    inputs: Tensors
    outputs: list[str] | None
    recorded: Any
    request_id: str | None = None  # the caller's, recorded with the result


@dataclass(slots=True)
class Answer(Generic[T]):
    """What a codec makes of the outputs: its reply, and the outputs as recorded."""

    reply: T
    recorded: Any


class InferenceCore:
    """What every inference route calls."""

    def __init__(
        self,
        registry: Registry,
        buffer: ResultBuffer | None,
        stats: InferenceStats,
        drift: DriftMonitor | None = None,
        shadow: ShadowRunner | None = None,
    ) -> None:
        self.registry = registry
        self.buffer = buffer
        self.stats = stats
        self.drift = drift
        self.shadow = shadow

    def model_by_name(self, name: str, version: str | None) -> LoadedModel:
        """A named model for the V2 routes, where no model loaded yet is a 404 too."""
        try:
            return self.registry.get(name, version)
        except NotReady:
            raise ModelNotFound(name, version, why=self.registry.why(name)) from None

    def route(self, model: LoadedModel, key: str | None) -> LoadedModel:
        """The arm of a traffic split that serves this request: ``model`` (the active
        version) or its canary. With the caller's key (the X-Edge-Key header) the key's
        bucket decides, so the same key always gets the same version; without one, a
        random draw per request. One dict read when there is no split."""
        held = self.registry.canary(model.name)
        if held is None or held[0] is model:
            return model
        canary, percent = held
        if key is None:
            return canary if random.random() * 100 < percent else model
        return canary if traffic_bucket(model.name, key) < percent * 100 else model

    def ready(self) -> bool:
        """Ready once at least one model is loaded."""
        return bool(self.registry.names())

    def infer(
        self,
        model: LoadedModel,
        decode: Callable[[LoadedModel, Any], Call],
        encode: Callable[[LoadedModel, Tensors], Answer[T]],
        request: Any = None,
    ) -> T:
        """Decode ``request``, run and encode it on ``model``, timed and recorded.

        ``decode(model, request)`` takes the request as an argument rather than in a
        closure: this runs on every request, and a closure per request costs.

        A request the codec refuses (bad rows, wrong shape: the caller's mistake) is a
        bad request of the model; once the tensors fit the manifest, whatever goes wrong
        (onnxruntime fails, an output is NaN or infinite) is the model's own failure.
        Probation and the health ``errors`` judge only the latter. Only an answered
        request is buffered.
        """
        m = model.manifest
        start = time.perf_counter()
        try:
            call = decode(model, request)
        except Exception:
            self.stats.refused(m.name, m.version)
            raise
        try:
            outputs = model.run(call.inputs, call.outputs)
            _check_finite(model, outputs)
            answer = encode(model, outputs)
        except Exception:
            self.stats.observe(m.name, m.version, time.perf_counter() - start, False)
            raise
        latency = time.perf_counter() - start
        self.stats.observe(m.name, m.version, latency, True)
        if self.drift is not None:
            self.drift.offer(model, call.inputs, outputs)  # a queue append, no binning here
        if self.shadow is not None:
            self.shadow.offer(model, call.inputs, outputs, latency)  # sampled, queued
        if self.buffer is not None:
            self.buffer.record(
                Result(time.time(), m.name, m.version, call.recorded, answer.recorded,
                       latency * 1000, call.request_id)
            )  # fmt: skip
        return answer.reply


def _check_finite(model: LoadedModel, outputs: Tensors) -> None:
    """A NaN or infinite output is the model failing: no JSON can carry it honestly."""
    for name, arr in outputs.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            index = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise ModelFailed(
                f"model {model.name!r} {model.version}: output {name!r}{list(index)} is "
                f"{float(arr[index])}, not a finite number (the model failed, not the request)"
            )
