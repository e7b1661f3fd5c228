"""The one judge of a package's model: does the graph fit the manifest, is every tensor
one the agent serves, and does this onnxruntime give the answers scikit-learn gave?

The device runs it before a version may become active, and ``edge-model verify`` runs
the very same functions, so a package that verifies is one the device accepts. Only
numpy here: the caller hands in the graph's tensor types and a way to run it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from agent.wire.datatypes import SERVED, TABLE, to_array
from agent.wire.errors import ParityFailed, SchemaUnsupported
from agent.wire.manifest import Manifest

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-6

# (feeds, output names) -> outputs by name
Runner = Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class _Tensor(Protocol):
    name: str
    type: str


class Session(Protocol):
    """What the judge needs of an ``onnxruntime.InferenceSession``."""

    def get_inputs(self) -> Sequence[_Tensor]: ...
    def get_outputs(self) -> Sequence[_Tensor]: ...
    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]: ...


def check_session(manifest: Manifest, session: Session) -> None:
    """``check_schema`` against a loaded session's graph."""
    check_schema(
        manifest,
        {i.name: i.type for i in session.get_inputs()},
        {o.name: o.type for o in session.get_outputs()},
    )


def runner(session: Session) -> Runner:
    """A plain session as a ``Runner`` for ``check_parity``."""

    def run(feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


def check_schema(
    manifest: Manifest, graph_inputs: Mapping[str, str], graph_outputs: Mapping[str, str]
) -> None:
    """Refuse a model whose tensors the agent cannot serve or that contradict the manifest.

    ``graph_inputs``/``graph_outputs`` map tensor names to onnxruntime type names
    (``tensor(float)``), as ``InferenceSession.get_inputs()`` reports them.
    """
    where = f"{manifest.name} {manifest.version}"
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
            if spec.datatype not in SERVED:
                raise SchemaUnsupported(
                    f"{field}: datatype {spec.datatype} is not served by the agent "
                    f"(expected one of {sorted(SERVED)})"
                )
            node = graph.get(spec.name)
            if node is None:
                raise SchemaUnsupported(
                    f"{field}: not an output of the ONNX graph (it has {sorted(graph)})"
                )
            if node != TABLE[spec.datatype].ort:
                raise SchemaUnsupported(
                    f"{field}: the manifest says {spec.datatype}, the ONNX graph has {node}"
                )
            if kind == "inputs" and (not spec.shape or spec.shape[0] != -1):
                raise SchemaUnsupported(
                    f"{field}: shape {spec.shape} has no batch dimension (expected [-1, ...])"
                )


def check_parity(manifest: Manifest, run: Runner) -> int:
    """Re-run the manifest's parity vectors; raise ParityFailed naming the worst row.

    Returns how many rows were checked.
    """
    where = f"{manifest.name} {manifest.version}"
    parity = manifest.parity
    inputs, expected = parity.get("inputs"), parity.get("expected")
    if not isinstance(inputs, dict) or not isinstance(expected, dict) or not expected:
        raise ParityFailed(f"{where}: parity: the manifest has no parity inputs/expected")
    exact = set(parity.get("exact") or [])
    try:
        rtol = float(parity.get("rtol", DEFAULT_RTOL))
        atol = float(parity.get("atol", DEFAULT_ATOL))
    except (TypeError, ValueError):
        raise ParityFailed(f"{where}: parity: rtol/atol are not numbers") from None
    feeds: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        if spec.name not in inputs:
            raise ParityFailed(f"{where}: parity.inputs: no rows for input {spec.name!r}")
        try:
            feeds[spec.name] = to_array(inputs[spec.name], spec.datatype)
        except (ValueError, TypeError) as e:
            raise ParityFailed(
                f"{where}: parity.inputs.{spec.name}: not {spec.datatype} values ({e})"
            ) from None
    outputs = {s.name for s in manifest.outputs}
    unknown = [n for n in expected if n not in outputs]
    if unknown:
        raise ParityFailed(f"{where}: parity.expected: {unknown} are not outputs of the model")
    try:
        got = run(feeds, list(expected))
    except Exception as e:
        raise ParityFailed(
            f"{where}: parity: the model failed on its own inputs: {one_line(e)}"
        ) from None
    for name, want in expected.items():
        _compare(where, name, got[name], want, exact=name in exact, rtol=rtol, atol=atol)
    first = next(iter(feeds.values()), None)
    return 0 if first is None or first.ndim == 0 else int(first.shape[0])


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


def one_line(e: BaseException) -> str:
    """An exception as one line of at most 300 characters (onnxruntime's span several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
