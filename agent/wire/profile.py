"""The reference profile of a model's training sample, and the drift score against it.

``edge-model convert --sample`` stores it in the manifest as ``profile`` (so the
signature covers it); the agent bins live inputs and outputs the same way and reports
how far they moved (``agent/quality/drift.py``). Both sides bin here, so a row lands in
the same bin on the workstation and on the device.

Per numeric feature: the cut points (``edges``) are the sample's deciles, duplicates
removed, and ``fractions`` the share of sample rows per bin: bin ``i`` holds values
``edges[i-1] <= v < edges[i]``, the first bin everything below ``edges[0]``, the last
everything from ``edges[-1]`` up (``numpy.searchsorted(side="right")``). Per output:
class frequencies for labels (``classes``), or decile bins like a feature for numbers.

The drift score is the population stability index over those bins::

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)

with ``p_i`` the live share of bin ``i`` and ``q_i`` the reference share, both raised
to at least ``EPSILON`` (1e-4) so an empty bin counts as a rare one instead of an
infinite score. Common reading: below 0.1 no shift, 0.1 to 0.25 a moderate one, above
0.25 a large one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# numpy is imported where it is used: fleet/ parses manifests (and their profile) on the
# central side, whose image has no numpy (deploy/Dockerfile.central, tests/test_deploy.py).
if TYPE_CHECKING:
    import numpy as np

from agent.wire.errors import ManifestInvalid

BINS = 10
EPSILON = 1e-4
# Bounds on what a manifest may ask the device to keep: a profile is per feature a
# handful of numbers, never a copy of the data.
MAX_FEATURES = 4096
MAX_BINS = 64
MAX_CLASSES = 1024
_NUMERIC = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16",
            "UINT32", "UINT64"}  # fmt: skip


@dataclass(frozen=True)
class FeatureProfile:
    """One numeric column: which input tensor and column it is, its bins."""

    name: str
    input: str
    column: int
    edges: np.ndarray
    fractions: np.ndarray


@dataclass(frozen=True)
class OutputProfile:
    """The prediction output: class frequencies (``classes``) or number bins (``edges``)."""

    name: str
    fractions: np.ndarray
    classes: tuple[Any, ...] | None = None
    edges: np.ndarray | None = None


@dataclass(frozen=True)
class Profile:
    rows: int
    features: tuple[FeatureProfile, ...]
    output: OutputProfile | None


# --- binning: the one rule both sides use --------------------------------------------


def quantile_edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Interior cut points at the sample's quantiles, duplicates removed."""
    import numpy as np

    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(0)
    qs = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Rows per bin (``len(edges) + 1`` bins); NaN and infinities are not counted."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)


def class_counts(classes: Sequence[Any], values: np.ndarray) -> np.ndarray:
    """Rows per class, plus one last bucket for labels not among ``classes``."""
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros(len(classes) + 1)
    uniques, n = np.unique(np.asarray(values).ravel(), return_counts=True)
    for value, k in zip(uniques.tolist(), n.tolist(), strict=True):
        key = value.decode() if isinstance(value, bytes) else value
        counts[index.get(key, len(classes))] += k
    return counts


def psi(live_counts: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of live counts against reference fractions."""
    import numpy as np

    total = float(live_counts.sum())
    if total <= 0:
        return 0.0
    p = np.maximum(live_counts / total, EPSILON)
    q = np.maximum(reference, EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


# --- building (converter) ------------------------------------------------------------


def _fractions(counts: np.ndarray) -> list[float]:
    total = float(counts.sum())
    return [round(float(c) / total, 6) if total else 0.0 for c in counts]


def build_profile(
    columns: Sequence[tuple[str, str, int, np.ndarray]],
    output: tuple[str, np.ndarray, Sequence[Any] | None] | None,
    *,
    bins: int = BINS,
) -> dict[str, Any]:
    """The manifest's ``profile`` from sample columns ``(name, input, column, values)``
    and the prediction output ``(name, values, classes or None)`` on the same rows."""
    import numpy as np

    rows = int(columns[0][3].shape[0]) if columns else 0
    features = []
    for name, tensor, column, given in columns:
        values = np.asarray(given, dtype=np.float64)
        edges = quantile_edges(values, bins)
        features.append({
            "name": name, "input": tensor, "column": column,
            "edges": [float(e) for e in edges],
            "fractions": _fractions(bin_counts(edges, values)),
        })  # fmt: skip
    profile: dict[str, Any] = {"rows": rows, "features": features}
    if output is not None:
        name, values, classes = output
        if classes is not None:
            counts = class_counts(classes, values)[:-1]
            profile["output"] = {"name": name, "classes": list(classes),
                                 "fractions": _fractions(counts)}  # fmt: skip
        else:
            values = np.asarray(values, dtype=np.float64).ravel()
            edges = quantile_edges(values, bins)
            profile["output"] = {"name": name, "edges": [float(e) for e in edges],
                                 "fractions": _fractions(bin_counts(edges, values))}  # fmt: skip
    return profile


# --- checking (every side) -----------------------------------------------------------


def _numbers(obj: Mapping[str, Any], key: str, where: str, *, limit: int) -> np.ndarray:
    import numpy as np

    value = obj.get(key)
    if (
        not isinstance(value, list)
        or len(value) > limit
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ManifestInvalid(f"{where}.{key}: expected a list of at most {limit} numbers, "
                              f"got {value!r:.60}")  # fmt: skip
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ManifestInvalid(f"{where}.{key}: expected finite numbers, got {value!r:.60}")
    return array


def _bins(obj: Mapping[str, Any], where: str, n: int) -> np.ndarray:
    fractions = _numbers(obj, "fractions", where, limit=MAX_BINS + 1)
    if fractions.size != n:
        raise ManifestInvalid(f"{where}.fractions: expected {n} numbers (one per bin), "
                              f"got {fractions.size}")  # fmt: skip
    if (fractions < 0).any() or (fractions.size and abs(float(fractions.sum()) - 1) > 1e-3):
        raise ManifestInvalid(f"{where}.fractions: expected shares >= 0 that sum to 1, "
                              f"got sum {float(fractions.sum()):.4f}")  # fmt: skip
    return fractions


def _edges(obj: Mapping[str, Any], where: str) -> np.ndarray:
    import numpy as np

    edges = _numbers(obj, "edges", where, limit=MAX_BINS)
    if edges.size > 1 and not (np.diff(edges) > 0).all():
        raise ManifestInvalid(f"{where}.edges: expected increasing numbers, got "
                              f"{obj.get('edges')!r:.60}")  # fmt: skip
    return edges


def check_profile(obj: Any, inputs: Mapping[str, tuple[str, list[int]]]) -> Profile:
    """A manifest's ``profile``, checked against its ``inputs`` (name -> datatype, shape);
    ManifestInvalid names the field."""
    if not isinstance(obj, dict):
        raise ManifestInvalid(f"profile: expected an object, got {obj!r:.60}")
    rows = obj.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ManifestInvalid(f"profile.rows: expected a non-negative integer, got {rows!r:.60}")
    items = obj.get("features")
    if not isinstance(items, list) or len(items) > MAX_FEATURES:
        raise ManifestInvalid(f"profile.features: expected a list of at most {MAX_FEATURES} "
                              f"objects, got {items!r:.60}")  # fmt: skip
    features = []
    for i, item in enumerate(items):
        where = f"profile.features[{i}]"
        if not isinstance(item, dict):
            raise ManifestInvalid(f"{where}: expected an object, got {item!r:.60}")
        name, tensor, column = item.get("name"), item.get("input"), item.get("column")
        if not isinstance(name, str) or not name:
            raise ManifestInvalid(f"{where}.name: expected a non-empty string, got {name!r:.60}")
        if not isinstance(tensor, str) or tensor not in inputs:
            raise ManifestInvalid(f"{where}.input: {tensor!r:.60} is not one of the manifest's "
                                  f"inputs {sorted(inputs)}")  # fmt: skip
        datatype, shape = inputs[tensor]
        if datatype not in _NUMERIC:
            raise ManifestInvalid(f"{where}.input: {tensor!r} is {datatype}, not numbers")
        width = shape[1] if len(shape) == 2 and shape[1] > 0 else 1
        if not isinstance(column, int) or isinstance(column, bool) or not 0 <= column < width:
            raise ManifestInvalid(f"{where}.column: expected an integer 0..{width - 1}, "
                                  f"got {column!r:.60}")  # fmt: skip
        edges = _edges(item, where)
        features.append(
            FeatureProfile(name, tensor, column, edges, _bins(item, where, edges.size + 1))
        )
    return Profile(rows, tuple(features), _output(obj.get("output")))


def _output(obj: Any) -> OutputProfile | None:
    if obj is None:
        return None
    where = "profile.output"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ManifestInvalid(f"{where}: expected an object with a name, got {obj!r:.60}")
    if "classes" in obj:
        classes = obj["classes"]
        if (
            not isinstance(classes, list)
            or not 0 < len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str | int) and not isinstance(c, bool) for c in classes)
        ):
            raise ManifestInvalid(f"{where}.classes: expected 1..{MAX_CLASSES} strings or "
                                  f"integers, got {classes!r:.60}")  # fmt: skip
        return OutputProfile(obj["name"], _bins(obj, where, len(classes)), classes=tuple(classes))
    edges = _edges(obj, where)
    return OutputProfile(obj["name"], _bins(obj, where, edges.size + 1), edges=edges)
