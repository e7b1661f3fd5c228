"""Input schema of a fitted estimator: which tensors the ONNX graph takes, and rows for them.

Two layouts exist. A plain numeric model takes one FP32 tensor ``input`` of shape
``[-1, n_features]``. A ColumnTransformer (alone or first in a Pipeline) takes one
tensor per column, named after the column, shape ``[-1, 1]``: FP32 for numbers,
BYTES for strings. Rows move through the converter as a ``Batch``: one array per
input, in the ONNX layout, numbers kept in float64 until the last moment so that the
scikit-learn side sees exactly what the user gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from agent.wire.errors import ConversionError
from agent.wire.manifest import TensorSpec

Batch = dict[str, np.ndarray]

# The largest magnitude a float32 holds with an absolute error below 1e-3: past it the
# ONNX graph no longer sees the numbers scikit-learn saw (24-bit mantissa).
FLOAT32_EXACT_RANGE = 2.0**13


@dataclass(frozen=True)
class InputSchema:
    inputs: list[TensorSpec]
    feature_names: list[str] | None
    n_features: int
    # True when each input is one named column (ColumnTransformer layout).
    by_column: bool

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def rows(self, batch: Batch) -> int:
        return int(next(iter(batch.values())).shape[0])


def column_transformer(estimator: Any) -> Any | None:
    """The ColumnTransformer that first sees the data, if there is one."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, ColumnTransformer):
        return estimator
    if isinstance(estimator, Pipeline) and isinstance(estimator.steps[0][1], ColumnTransformer):
        return estimator.steps[0][1]
    return None


def _names(values: Any) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


def _string_columns(ct: Any) -> set[str]:
    """Columns whose fitted encoder learnt string categories."""
    found: set[str] = set()
    for _, transformer, cols in ct.transformers_:
        if isinstance(transformer, str):
            continue
        steps = getattr(transformer, "steps", [(None, transformer)])
        for _, step in steps:
            categories = getattr(step, "categories_", None)
            if categories is None:
                continue
            col_list = [cols] if isinstance(cols, str) else list(cols)
            for col, cats in zip(col_list, categories, strict=False):
                if np.asarray(cats).dtype.kind in "OUS":
                    found.add(str(col))
            break
    return found


def infer_schema(estimator: Any, sample: Any = None, *, double: bool = False) -> InputSchema:
    """Input tensors for ``estimator``; a DataFrame ``sample`` decides column types.

    ``double`` asks for FP64 number inputs (a float64 graph, for features whose
    magnitude float32 cannot hold precisely enough).
    """
    number = "FP64" if double else "FP32"
    feature_names = _names(getattr(estimator, "feature_names_in_", None))
    ct = column_transformer(estimator)
    if ct is not None and getattr(ct, "feature_names_in_", None) is not None:
        columns = _names(ct.feature_names_in_) or []
        strings = _string_columns(ct)
        if sample is not None and hasattr(sample, "dtypes"):
            given = {str(c) for c in sample.columns}
            # Columns the sample lacks keep their fitted type; sample_batch reports them.
            strings = {c for c in columns if c in given and sample[c].dtype.kind not in "biuf"} | {
                c for c in strings if c not in given
            }
        specs = [TensorSpec(c, "BYTES" if c in strings else number, [-1, 1]) for c in columns]
        return InputSchema(specs, columns, len(columns), by_column=True)
    if ct is not None and _string_columns(ct):
        raise ConversionError(
            "model: the ColumnTransformer encodes strings but was fitted on an array without "
            "column names; fit it on a pandas DataFrame so each input can be named after its "
            "column"
        )
    # A ColumnTransformer fitted on a numeric array selects columns by index: one input.
    n = getattr(estimator, "n_features_in_", None)
    if not isinstance(n, int | np.integer):
        raise ConversionError(
            f"model: {type(estimator).__name__} does not say how many features it takes "
            "(no n_features_in_); is it fitted?"
        )
    return InputSchema(
        [TensorSpec("input", number, [-1, int(n)])], feature_names, int(n), by_column=False
    )


# --- samples ----------------------------------------------------------------------


def read_sample(path: Path) -> Any:
    """A ``.npy`` array or a CSV file with a header row (as a DataFrame)."""
    if not path.is_file():
        raise ConversionError(f"sample: {path} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConversionError(f"sample: {path} is not a readable .npy array ({e})") from None
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"sample: {path} is not a readable CSV file ({e})") from None


def sample_batch(schema: InputSchema, sample: Any) -> Batch:
    """Check a sample against the schema and turn it into a Batch."""
    if hasattr(sample, "columns"):
        columns = [str(c) for c in sample.columns]
        expected = schema.feature_names
        if expected is not None and columns != expected:
            missing = [c for c in expected if c not in columns]
            extra = [c for c in columns if c not in expected]
            raise ConversionError(
                f"sample: columns {columns} do not match the model's {expected} "
                f"(missing {missing}, unexpected {extra})"
            )
        if schema.by_column:
            return {
                spec.name: _column(sample[spec.name].to_numpy(), spec) for spec in schema.inputs
            }
        sample = sample.to_numpy()
    array = np.asarray(sample)
    if array.ndim != 2 or array.shape[1] != schema.n_features:
        raise ConversionError(
            f"sample: shape {list(array.shape)}, expected [rows, {schema.n_features}] "
            f"({schema.n_features} features per row)"
        )
    if schema.by_column:
        return {spec.name: _column(array[:, i], spec) for i, spec in enumerate(schema.inputs)}
    try:
        return {"input": array.astype(np.float64)}
    except ValueError as e:
        raise ConversionError(f"sample: not all values are numbers ({e})") from None


def _column(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.datatype == "BYTES":
        return np.array([str(v) for v in values], dtype=object).reshape(-1, 1)
    try:
        return values.astype(np.float64).reshape(-1, 1)
    except ValueError as e:
        raise ConversionError(f"sample: column {spec.name!r} is not numeric ({e})") from None


# --- generated rows ---------------------------------------------------------------


def _location_scale(step: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the training data lay, as far as the first fitted step remembers it."""
    steps = getattr(step, "steps", None)
    if steps:
        step = steps[0][1]
    mean, scale = getattr(step, "mean_", None), getattr(step, "scale_", None)
    if mean is not None and scale is not None and np.shape(mean) == (n,):
        return np.asarray(mean, float), np.asarray(scale, float)
    lo, hi = getattr(step, "data_min_", None), getattr(step, "data_max_", None)
    if lo is not None and hi is not None and np.shape(lo) == (n,):
        return (np.asarray(lo) + np.asarray(hi)) / 2, np.maximum(np.asarray(hi) - lo, 1e-3) / 4
    return _tree_range(step, n)


def _tree_range(step: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    trees = [step]
    estimators = getattr(step, "estimators_", None)
    if estimators is not None:
        trees = list(np.ravel(np.asarray(estimators, dtype=object)))
    for tree in trees:
        structure = getattr(tree, "tree_", None)
        if structure is None:
            continue
        used = structure.feature >= 0
        for f, t in zip(structure.feature[used], structure.threshold[used], strict=True):
            lo[f], hi[f] = min(lo[f], t), max(hi[f], t)
    known = np.isfinite(lo)
    lo, hi = np.where(known, lo, -1.0), np.where(known, hi, 1.0)
    mean = (lo + hi) / 2
    scale = np.maximum(hi - lo, 1e-3) / 2
    return mean, scale


def _categories(ct: Any) -> dict[str, tuple[list[Any], bool]]:
    """Per string column: the fitted categories, and whether an unseen one is accepted."""
    out: dict[str, tuple[list[Any], bool]] = {}
    for _, transformer, cols in ct.transformers_:
        if isinstance(transformer, str):
            continue
        for _, step in getattr(transformer, "steps", [(None, transformer)]):
            categories = getattr(step, "categories_", None)
            if categories is not None:
                unknown_ok = getattr(step, "handle_unknown", "error") != "error"
                col_list = [cols] if isinstance(cols, str) else list(cols)
                for col, cats in zip(col_list, categories, strict=False):
                    # NaN (a missing-value category) is not a value to generate.
                    values = [c for c in np.asarray(cats).tolist() if not _is_nan(c)]
                    out[str(col)] = (values, unknown_ok)
                break
    return out


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and np.isnan(value)


def generate_batch(estimator: Any, schema: InputSchema, rows: int, seed: int = 0) -> Batch:
    """Rows of the right schema near the training data, rounded to float32.

    Rounding first means both sides see the same numbers: the check then measures the
    graph's arithmetic, not the rounding of made-up inputs.
    """
    rng = np.random.default_rng(seed)
    if not schema.by_column:
        mean, scale = _location_scale(_first_step(estimator), schema.n_features)
        x = rng.normal(mean, scale, size=(rows, schema.n_features))
        return {"input": x.astype(np.float32).astype(np.float64)}
    ct = column_transformer(estimator)
    categories = _categories(ct)
    batch: Batch = {}
    for spec in schema.inputs:
        if spec.datatype == "BYTES":
            # An unseen value exercises handle_unknown="ignore" where the encoder has it.
            values, unknown_ok = categories.get(spec.name, ([], True))
            choices = [str(c) for c in values] or ["a"]
            if unknown_ok:
                choices.append("__unseen__")
            picked = rng.integers(0, len(choices), size=rows)
            batch[spec.name] = np.array([choices[i] for i in picked], dtype=object).reshape(-1, 1)
        else:
            col_mean, col_scale = _column_location(ct, spec.name)
            column = rng.normal(col_mean, col_scale, size=(rows, 1))
            batch[spec.name] = column.astype(np.float32).astype(np.float64)
    return batch


def _first_step(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[0][1] if steps else estimator


def _column_location(ct: Any, column: str) -> tuple[float, float]:
    for _, transformer, cols in ct.transformers_:
        col_list = [cols] if isinstance(cols, str) else [str(c) for c in cols]
        if column in col_list and not isinstance(transformer, str):
            mean, scale = _location_scale(transformer, len(col_list))
            i = col_list.index(column)
            return float(mean[i]), float(scale[i])
    return 0.0, 1.0


# --- feeding both sides -----------------------------------------------------------


def sklearn_input(schema: InputSchema, batch: Batch) -> Any:
    """What scikit-learn's predict takes: a DataFrame when the model knows column names."""
    if schema.by_column:
        import pandas as pd

        return pd.DataFrame({name: batch[name][:, 0] for name in schema.names})
    x = batch["input"]
    if schema.feature_names is not None:
        import pandas as pd

        return pd.DataFrame(x, columns=schema.feature_names)
    return x


def onnx_feeds(schema: InputSchema, batch: Batch) -> dict[str, np.ndarray]:
    """The tensors onnxruntime takes, in each input's datatype."""
    feeds = {}
    for spec in schema.inputs:
        values = batch[spec.name]
        if spec.datatype == "BYTES":
            feeds[spec.name] = values.astype(object)
        elif spec.datatype == "FP64":
            feeds[spec.name] = values.astype(np.float64)
        else:
            feeds[spec.name] = values.astype(np.float32)
    return feeds


def take_rows(batch: Batch, index: np.ndarray) -> Batch:
    return {name: values[index] for name, values in batch.items()}
