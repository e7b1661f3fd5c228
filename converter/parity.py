"""Parity between scikit-learn and onnxruntime on the same rows.

Labels must match exactly. Probabilities, scores and regression outputs must match
within ``|onnx - sklearn| <= ATOL + RTOL * |sklearn|``. The graph computes in float32
(24-bit mantissa, relative rounding 6e-8 per operation), scikit-learn in float64;
across all families measured in tests/converter (docs/converter.md) the largest gap
was a few 1e-6, so 1e-4 leaves margin for a different CPU (arm64 FMA, other kernels)
while still catching a wrong graph, whose errors are of the order of the outputs.

A row whose decision is a near tie in scikit-learn itself (top two probabilities, the
two nearest cluster centres, an outlier score at the threshold) may legitimately fall
either way in float32; such rows are counted and left out, never stored for the device.
So may a row that sits on a tree split after a float transform (a scaler before a
tree): when scikit-learn's own answer for a failing row moves past the tolerance as
its inputs move by a few float32 rounding steps, the row is float32-sensitive. Up to
1% of rows may be excused that way; more means the model as a whole does not survive
float32, and the check fails with advice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from agent.wire.errors import ParityFailed

from converter.schema import FLOAT32_EXACT_RANGE, Batch, InputSchema, sklearn_input

RTOL = 1e-4
ATOL = 1e-4
# Margins below this are near ties (see the module docstring).
TIE_MARGIN = 1e-3
# Relative input nudge for the float32-sensitivity probe: 4 float32 rounding steps.
NUDGE = 2.0**-21
NUDGES = 8
MAX_SENSITIVE_FRACTION = 0.01


def sklearn_outputs(estimator: Any, task: str, x: Any, names: list[str]) -> dict[str, np.ndarray]:
    """What scikit-learn gives for each ONNX output it has a counterpart for."""
    methods: dict[str, str] = {
        "classifier": {"label": "predict", "probabilities": "predict_proba"},
        "regressor": {"variable": "predict"},
        "cluster": {"label": "predict", "scores": "transform"},
        "outlier": {"label": "predict", "scores": "decision_function"},
        "transformer": {"variable": "transform"},
    }[task]
    out = {}
    for name in names:
        method = methods.get(name)
        if method is not None and hasattr(estimator, method):
            out[name] = np.asarray(getattr(estimator, method)(x))
    return out


def margins(estimator: Any, task: str, x: Any) -> np.ndarray | None:
    """How far each row is from changing its label, in scikit-learn's own numbers."""
    if task == "classifier":
        for method in ("predict_proba", "decision_function"):
            if hasattr(estimator, method):
                scores = np.asarray(getattr(estimator, method)(x), dtype=float)
                if scores.ndim == 1:
                    return np.asarray(np.abs(scores))
                top = np.sort(scores, axis=1)
                return np.asarray(top[:, -1] - top[:, -2])
    if task == "cluster" and hasattr(estimator, "transform"):
        dist = np.sort(np.asarray(estimator.transform(x), dtype=float), axis=1)
        return np.asarray(dist[:, 1] - dist[:, 0]) if dist.shape[1] > 1 else None
    if task == "outlier" and hasattr(estimator, "decision_function"):
        return np.asarray(np.abs(np.asarray(estimator.decision_function(x), dtype=float)))
    return None


@dataclass
class OutputDiff:
    name: str
    exact: bool
    mismatches: int = 0
    max_abs: float = 0.0
    worst_rows: list[int] = field(default_factory=list)
    detail: str = ""


@dataclass
class ParityResult:
    rows: int
    ties: int
    rtol: float
    atol: float
    outputs: dict[str, OutputDiff]
    expected: dict[str, np.ndarray]
    failed_rows: np.ndarray  # bool per row
    skipped_rows: np.ndarray  # bool per row: near ties and excused rows
    sensitive: int = 0  # failing rows excused as float32-sensitive

    @property
    def ok(self) -> bool:
        return all(d.mismatches == 0 for d in self.outputs.values())

    def summary(self) -> str:
        parts = [f"{self.rows} rows"]
        if self.ties:
            parts.append(f"{self.ties} near ties skipped")
        if self.sensitive:
            parts.append(f"{self.sensitive} float32-sensitive rows skipped")
        for d in self.outputs.values():
            if d.exact:
                parts.append(f"{d.name}: {d.mismatches} differ")
            else:
                parts.append(f"{d.name}: max abs diff {d.max_abs:.2g}")
        return ", ".join(parts)


def _reshape_like(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    if expected.shape != actual.shape and expected.size == actual.size:
        return expected.reshape(actual.shape)
    return expected


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as plain Python values, for messages."""
    return value.tolist() if hasattr(value, "tolist") else value


def compare(
    expected: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    *,
    exact: list[str],
    skip: np.ndarray,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> ParityResult:
    rows = int(skip.shape[0])
    failed = np.zeros(rows, dtype=bool)
    diffs: dict[str, OutputDiff] = {}
    shaped: dict[str, np.ndarray] = {}
    for name, raw in expected.items():
        got = actual[name]
        want = _reshape_like(raw, got)
        shaped[name] = want
        if want.shape != got.shape:
            diffs[name] = OutputDiff(name, name in exact, mismatches=rows, detail="shape")
            diffs[name].detail = f"shape {list(got.shape)}, scikit-learn {list(want.shape)}"
            failed[:] = True
            continue
        if name in exact:
            bad = (want.reshape(rows, -1) != got.reshape(rows, -1)).any(axis=1) & ~skip
            diff = OutputDiff(
                name, True, int(bad.sum()), worst_rows=np.flatnonzero(bad)[:3].tolist()
            )
            if diff.worst_rows:
                r = diff.worst_rows[0]
                diff.detail = (
                    f"row {r}: scikit-learn {_plain(want[r])!r}, onnxruntime {_plain(got[r])!r}"
                )
        else:
            w = want.astype(np.float64).reshape(rows, -1)
            g = got.astype(np.float64).reshape(rows, -1)
            gap = np.abs(g - w)
            excess = (gap / (atol + rtol * np.abs(w))).max(axis=1, initial=0.0)
            excess[skip] = 0.0
            bad = excess > 1.0
            diff = OutputDiff(name, False, int(bad.sum()))
            diff.max_abs = float(gap[~skip].max(initial=0.0))
            diff.worst_rows = [int(r) for r in np.argsort(-excess)[:3] if bad[r]]
            if diff.worst_rows:
                r = diff.worst_rows[0]
                diff.detail = f"row {r}: max abs diff {gap[r].max():.3g}"
        failed |= bad
        diffs[name] = diff
    return ParityResult(rows, int(skip.sum()), rtol, atol, diffs, shaped, failed, skip)


def float32_advice(schema: InputSchema, batch: Batch) -> str:
    """Why float32 may be the culprit, and what to do about it, when inputs are large."""
    numeric = [batch[s.name] for s in schema.inputs if s.datatype == "FP32"]
    if not numeric:
        return ""
    peak = max(float(np.abs(v.astype(np.float64)).max(initial=0.0)) for v in numeric)
    if peak <= FLOAT32_EXACT_RANGE:
        return ""
    return (
        f"; inputs reach {peak:.3g} in magnitude and the ONNX graph takes and computes float32 "
        "(about 7 significant digits), so the inputs themselves and the sums over them round: "
        "convert with --double (FP64 inputs and graph), or centre and scale the features "
        "before they reach the model (a scaler inside the Pipeline cannot undo the rounding "
        "of its float32 input)"
    )


def raise_on_failure(result: ParityResult, schema: InputSchema, batch: Batch) -> None:
    if result.ok:
        return
    problems = []
    for d in result.outputs.values():
        if d.mismatches:
            rows = ", ".join(str(r) for r in d.worst_rows)
            which = "rows" if d.exact else "worst rows"
            problems.append(
                f"{d.name} differs on {d.mismatches} of {result.rows} rows "
                f"({which} {rows}; {d.detail})"
            )
    tolerance = f"tolerance atol {result.atol:g} + rtol {result.rtol:g}"
    raise ParityFailed(f"parity: {'; '.join(problems)}; {tolerance}{float32_advice(schema, batch)}")


def run_sklearn(
    estimator: Any, task: str, schema: InputSchema, batch: Batch, names: list[str]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """scikit-learn outputs and the per-row near-tie mask."""
    x = sklearn_input(schema, batch)
    expected = sklearn_outputs(estimator, task, x, names)
    margin = margins(estimator, task, x)
    rows = schema.rows(batch)
    ties = np.zeros(rows, dtype=bool) if margin is None else margin < TIE_MARGIN
    return expected, ties


def float32_sensitive(
    estimator: Any,
    task: str,
    schema: InputSchema,
    batch: Batch,
    *,
    expected: dict[str, np.ndarray],
    rows: np.ndarray,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> np.ndarray:
    """Which of ``rows`` scikit-learn itself answers differently after a float32-sized nudge."""
    rng = np.random.default_rng(0)
    unstable = np.zeros(rows.size, dtype=bool)
    base = {name: values[rows] for name, values in expected.items()}
    for _ in range(NUDGES):
        nudged = {}
        for spec in schema.inputs:
            values = batch[spec.name][rows]
            if spec.datatype != "BYTES":
                values = values * (1 + NUDGE * rng.choice([-1.0, 1.0], size=values.shape))
            nudged[spec.name] = values
        moved, _ = run_sklearn(estimator, task, schema, nudged, list(base))
        for name, values in moved.items():
            was = base[name].reshape(rows.size, -1)
            now = values.reshape(rows.size, -1)
            if was.dtype.kind in "fc":
                gap = np.abs(now.astype(np.float64) - was) > atol + rtol * np.abs(was)
            else:
                gap = now != was
            unstable |= gap.any(axis=1)
    return unstable


def excusable_rows(
    result: ParityResult, estimator: Any, task: str, schema: InputSchema, batch: Batch
) -> np.ndarray:
    """Failing rows to leave out as float32-sensitive: all of them when few and all are; else none."""
    excused = np.zeros_like(result.failed_rows)
    failed = np.flatnonzero(result.failed_rows)
    if failed.size == 0 or failed.size > max(1, MAX_SENSITIVE_FRACTION * result.rows):
        return excused
    sensitive = float32_sensitive(
        estimator,
        task,
        schema,
        batch,
        expected=result.expected,
        rows=failed,
        rtol=result.rtol,
        atol=result.atol,
    )
    if sensitive.all():
        excused[failed] = True
    return excused
