"""One onnxruntime session per model version: load, check the schema, warm up, run.

``check_parity`` re-runs the manifest's parity vectors (what scikit-learn answered on
the publisher's workstation) on this device's onnxruntime before a version may become
active: a different onnxruntime build or CPU must give the same answers. The judgement
itself is ``agent.wire.parity``, the one ``edge-model verify`` uses too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from agent.wire import parity
from agent.wire.datatypes import numpy_dtype, to_array
from agent.wire.errors import BadRequest, ModelLoadFailed
from agent.wire.manifest import Manifest, TensorSpec
from agent.wire.parity import one_line


class LoadedModel:
    """A loaded, warmed-up model version; ``run`` is safe to call from many threads."""

    def __init__(self, manifest: Manifest, path: Path, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.path = path
        self.session = session
        self.name = manifest.name
        self.version = manifest.version
        self.inputs: dict[str, TensorSpec] = {s.name: s for s in manifest.inputs}
        self.outputs: dict[str, TensorSpec] = {s.name: s for s in manifest.outputs}
        self.loaded_at = time.time()
        self._output_names = [s.name for s in manifest.outputs]

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {self.version!r})"

    def run(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; returns the requested outputs (default: all) by name."""
        names = self._output_names if outputs is None else outputs
        try:
            results = self.session.run(names, inputs)
        except InvalidArgument as e:
            # Shape, rank or dtype that does not fit the graph: the caller's tensor is wrong.
            raise BadRequest(f"inputs: {one_line(e)}") from None
        return dict(zip(names, results, strict=True))


def load_model(
    version_dir: Path,
    manifest: Manifest,
    *,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
) -> LoadedModel:
    """Open the version's ONNX file, check it against the manifest, warm it up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # warnings about unused initialisers are noise on a device
    path = version_dir / manifest.artifact.file
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        raise ModelLoadFailed(
            f"{manifest.name} {manifest.version}: onnxruntime cannot load "
            f"{manifest.artifact.file}: {one_line(e)}"
        ) from None
    parity.check_session(manifest, session)
    model = LoadedModel(manifest, version_dir, session)
    _warm_up(model)
    return model


def _warm_up(model: LoadedModel) -> None:
    """First runs allocate and pick kernels; do that now, not on a caller's request."""
    parity_inputs = model.manifest.parity.get("inputs")
    feeds: dict[str, np.ndarray] = {}
    for spec in model.manifest.inputs:
        sample = parity_inputs.get(spec.name) if isinstance(parity_inputs, dict) else None
        if sample:
            feeds[spec.name] = to_array(sample[:1], spec.datatype)
        else:
            shape = [1 if d < 0 else d for d in spec.shape]
            fill: Any = "" if spec.datatype == "BYTES" else 0
            feeds[spec.name] = np.full(shape, fill, dtype=numpy_dtype(spec.datatype))
    try:
        model.run(feeds)
    except Exception as e:
        raise ModelLoadFailed(
            f"{model.name} {model.version}: warm-up run failed: {one_line(e)}"
        ) from None


def check_parity(model: LoadedModel) -> int:
    """Re-run the manifest's parity vectors on this device (``agent.wire.parity``)."""
    return parity.check_parity(model.manifest, model.run)
