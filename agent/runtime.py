"""One onnxruntime session per model version: load, check the schema, warm up, run.

``check_parity`` re-runs the manifest's parity vectors (what scikit-learn answered on
the publisher's workstation) on this device's onnxruntime before a version may become
active: a different onnxruntime build or CPU must give the same answers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from agent.errors import BadRequest, ModelLoadFailed, ParityFailed, SchemaUnsupported
from agent.manifest import Manifest, TensorSpec

# Open Inference Protocol datatype -> numpy dtype, for the datatypes the agent serves.
DTYPES: dict[str, Any] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}
# onnxruntime's type names for the same.
_ORT_TYPES = {
    "FP32": "tensor(float)",
    "FP64": "tensor(double)",
    "INT32": "tensor(int32)",
    "INT64": "tensor(int64)",
    "BOOL": "tensor(bool)",
    "BYTES": "tensor(string)",
}
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6


def to_array(values: Any, datatype: str) -> np.ndarray:
    """JSON values -> a numpy array of the tensor's datatype (BYTES: an object array of str)."""
    if datatype == "BYTES":
        arr = np.array(values, dtype=object)
        flat = arr.reshape(-1)
        for i, v in enumerate(flat):
            if isinstance(v, bytes):
                flat[i] = v.decode("utf-8")
            elif not isinstance(v, str):
                flat[i] = str(v)
        return arr
    return np.asarray(values, dtype=DTYPES[datatype])


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
            raise BadRequest(f"inputs: {_one_line(e)}") from None
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
            f"{manifest.artifact.file}: {_one_line(e)}"
        ) from None
    check_schema(manifest, session)
    model = LoadedModel(manifest, version_dir, session)
    _warm_up(model)
    return model


def check_schema(manifest: Manifest, session: ort.InferenceSession) -> None:
    """Refuse a model whose tensors the agent cannot serve or that contradict the manifest."""
    where = f"{manifest.name} {manifest.version}"
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = {o.name: o for o in session.get_outputs()}
    declared = {s.name for s in manifest.inputs}
    if set(graph_inputs) != declared:
        raise SchemaUnsupported(
            f"{where}: inputs: the manifest declares {sorted(declared)}, "
            f"the ONNX graph takes {sorted(graph_inputs)}"
        )
    for kind, specs, graph in (
        ("inputs", manifest.inputs, graph_inputs),
        ("outputs", manifest.outputs, graph_outputs),
    ):
        for i, spec in enumerate(specs):
            field = f"{where}: {kind}[{i}] {spec.name!r}"
            if spec.datatype not in _ORT_TYPES:
                raise SchemaUnsupported(
                    f"{field}: datatype {spec.datatype} is not served "
                    f"(expected one of {sorted(_ORT_TYPES)})"
                )
            node = graph.get(spec.name)
            if node is None:
                raise SchemaUnsupported(
                    f"{field}: not an output of the ONNX graph (it has {sorted(graph)})"
                )
            if node.type != _ORT_TYPES[spec.datatype]:
                raise SchemaUnsupported(
                    f"{field}: the manifest says {spec.datatype}, the ONNX graph has {node.type}"
                )
            if kind == "inputs" and (not spec.shape or spec.shape[0] != -1):
                raise SchemaUnsupported(
                    f"{field}: shape {spec.shape} has no batch dimension (expected [-1, ...])"
                )


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
            feeds[spec.name] = np.full(shape, fill, dtype=DTYPES[spec.datatype])
    try:
        model.run(feeds)
    except Exception as e:
        raise ModelLoadFailed(
            f"{model.name} {model.version}: warm-up run failed: {_one_line(e)}"
        ) from None


def check_parity(model: LoadedModel) -> None:
    """Re-run the manifest's parity vectors; raise ParityFailed naming the worst row."""
    where = f"{model.name} {model.version}"
    parity = model.manifest.parity
    inputs, expected = parity.get("inputs"), parity.get("expected")
    if not isinstance(inputs, dict) or not isinstance(expected, dict) or not expected:
        raise ParityFailed(f"{where}: parity: the manifest has no parity inputs/expected")
    exact = set(parity.get("exact") or [])
    rtol = float(parity.get("rtol", DEFAULT_RTOL))
    atol = float(parity.get("atol", DEFAULT_ATOL))
    feeds: dict[str, np.ndarray] = {}
    for name, spec in model.inputs.items():
        if name not in inputs:
            raise ParityFailed(f"{where}: parity.inputs: no rows for input {name!r}")
        try:
            feeds[name] = to_array(inputs[name], spec.datatype)
        except (ValueError, TypeError) as e:
            raise ParityFailed(
                f"{where}: parity.inputs.{name}: not {spec.datatype} values ({e})"
            ) from None
    unknown = [n for n in expected if n not in model.outputs]
    if unknown:
        raise ParityFailed(f"{where}: parity.expected: {unknown} are not outputs of the model")
    try:
        got = model.run(feeds, list(expected))
    except Exception as e:
        raise ParityFailed(
            f"{where}: parity: the model failed on its own inputs: {_one_line(e)}"
        ) from None
    for name, want in expected.items():
        _compare(where, name, got[name], want, exact=name in exact, rtol=rtol, atol=atol)


def _compare(
    where: str, name: str, got: np.ndarray, want: Any, *, exact: bool, rtol: float, atol: float
) -> None:
    got_rows = got.tolist()
    if not isinstance(want, list) or len(want) != len(got_rows):
        count = len(want) if isinstance(want, list) else want
        raise ParityFailed(
            f"{where}: parity: output {name!r}: {len(got_rows)} rows, expected {count}"
        )
    if exact:
        for row, (g, w) in enumerate(zip(got_rows, want, strict=True)):
            if g != w:
                raise ParityFailed(
                    f"{where}: parity: output {name!r} row {row}: got {g!r}, expected {w!r} "
                    "(compared exactly)"
                )
        return
    try:
        want_arr = np.asarray(want, dtype=np.float64)
        got_arr = np.asarray(got, dtype=np.float64)
    except (ValueError, TypeError):
        raise ParityFailed(
            f"{where}: parity: output {name!r}: expected values are not numbers"
        ) from None
    if want_arr.shape != got_arr.shape:
        raise ParityFailed(
            f"{where}: parity: output {name!r}: shape {list(got_arr.shape)}, "
            f"expected {list(want_arr.shape)}"
        )
    excess = np.abs(got_arr - want_arr) - (atol + rtol * np.abs(want_arr))
    excess = np.where(np.isnan(got_arr) != np.isnan(want_arr), np.inf, np.nan_to_num(excess))
    per_row = excess.reshape(len(got_rows), -1).max(axis=1) if got_arr.size else excess
    if per_row.size and per_row.max() > 0:
        row = int(per_row.argmax())
        diff = float(np.nanmax(np.abs(got_arr[row] - want_arr[row])))
        raise ParityFailed(
            f"{where}: parity: output {name!r} row {row}: got {got_rows[row]!r}, expected "
            f"{want[row]!r} (max difference {diff:.3g}, rtol={rtol:g}, atol={atol:g})"
        )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
