"""The ``/predict`` codec: features (rows or named columns) in, one value per row out.

No sockets here: ``Predictor.predict`` takes the parsed JSON body and answers a dict;
the run itself is the inference core's (``agent/serving/core.py``).
Every refusal is a ``BadRequest`` naming the row and column, so a caller can find the
offending value in a thousand-row request without guessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.models.runtime import LoadedModel
from agent.serving.core import Answer, Call, InferenceCore, Tensors
from agent.wire import payloads
from agent.wire.datatypes import FLOATS, INTS, expected_value, numpy_dtype, value_ok
from agent.wire.errors import BadRequest
from agent.wire.manifest import Manifest, TensorSpec

_NUMBER_TYPES = frozenset((int, float))
# Below this magnitude every number fits FP32 (max ~3.4e38): no overflow to check for.
_FP32_SAFE = 3.0e38
_BODY_KEYS = frozenset(("features", "probabilities", "request_id"))


def allows_nan(manifest: Manifest) -> bool:
    """Models say so in the manifest (``allow_nan``); tree ensembles from skl2onnx do not."""
    return manifest.raw.get("allow_nan") is True


@dataclass(frozen=True)
class Schema:
    """How ``/predict`` rows map onto a model's inputs, computed once per manifest."""

    matrix: TensorSpec | None  # one [-1, n] input: rows are lists of n values
    width: int | None  # n, or None when the model takes any width
    columns: list[str]  # names a dict row uses: feature names, or the input names
    datatypes: list[str]  # per column
    specs: list[TensorSpec]  # column models: one input per column
    dtype: Any = None  # the matrix input's numpy type

    @property
    def expected_columns(self) -> str:
        return ", ".join(self.columns) or "none"


def _schema_of(manifest: Manifest) -> Schema:
    inputs = manifest.inputs
    if len(inputs) == 1 and len(inputs[0].shape) == 2 and inputs[0].shape[1] != 1:
        spec = inputs[0]
        width = spec.shape[1] if spec.shape[1] > 0 else None
        names = manifest.feature_names or []
        columns = [str(n) for n in names] if width is not None and len(names) == width else []
        return Schema(
            spec, width, columns, [spec.datatype] * len(columns), [], numpy_dtype(spec.datatype)
        )
    return Schema(None, len(inputs), [i.name for i in inputs], [i.datatype for i in inputs], inputs)


_SCHEMAS: dict[int, tuple[Manifest, Schema]] = {}


def schema_of(manifest: Manifest) -> Schema:
    cached = _SCHEMAS.get(id(manifest))
    if cached is not None and cached[0] is manifest:
        return cached[1]
    if len(_SCHEMAS) > 64:
        _SCHEMAS.clear()
    schema = _schema_of(manifest)
    _SCHEMAS[id(manifest)] = (manifest, schema)
    return schema


def _type_name(v: Any) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean"}.get(
        type(v), repr(v)[:40]
    )


def _bad_value(where: str, v: Any, datatype: str) -> BadRequest:
    return BadRequest(f"{where}: expected {expected_value(datatype)}, got {v!r:.60}")


def _dict_row_to_list(i: int, row: dict[str, Any], schema: Schema) -> list[Any]:
    if not schema.columns:
        raise BadRequest(
            f"features[{i}]: this model takes rows as lists of {schema.width or 'n'} values "
            "(it has no feature names for named columns)"
        )
    try:
        values = [row[c] for c in schema.columns]
    except KeyError:
        missing = [c for c in schema.columns if c not in row]
        raise BadRequest(
            f"features[{i}]: missing column {missing[0]!r} (expected columns: {schema.expected_columns})"
        ) from None
    if len(row) != len(schema.columns):
        extra = [k for k in row if k not in set(schema.columns)]
        raise BadRequest(
            f"features[{i}]: unknown column {extra[0]!r} (expected columns: {schema.expected_columns})"
        )
    return values


def _matrix_rows(rows: list[Any], schema: Schema) -> list[list[Any]]:
    """Rows as lists of exactly n numbers; named rows mapped through the feature names."""
    assert schema.matrix is not None
    n = schema.width
    datatype = schema.matrix.datatype
    floats = datatype in FLOATS
    out = rows
    for i, raw in enumerate(rows):
        row = raw
        if type(raw) is dict:
            if out is rows:
                out = list(rows)
            row = out[i] = _dict_row_to_list(i, raw, schema)
        elif type(row) is not list:
            raise BadRequest(
                f"features[{i}]: expected a list of {n or 'n'} values, got {_type_name(row)}"
            )
        if n is None:
            n = len(row)
        if len(row) != n:
            what = "numbers" if floats or datatype in INTS else "values"
            raise BadRequest(f"features[{i}]: expected {n} {what}, got {len(row)}")
        # Fast path for the common case, checked in C: every value a plain int or float.
        if floats and _NUMBER_TYPES.issuperset(map(type, row)):
            continue
        for j, v in enumerate(row):
            if not value_ok(v, datatype):
                raise _bad_value(_where(i, j, schema), v, datatype)
    return out


def _where(i: int, j: int, schema: Schema) -> str:
    if schema.columns and j < len(schema.columns):
        return f"features[{i}][{j}] ({schema.columns[j]})"
    return f"features[{i}][{j}]"


def _check_finite(arr: np.ndarray, rows: list[Any], schema: Schema, model: str) -> None:
    if arr.dtype.kind != "f" or bool(np.isfinite(arr).all()):
        return
    i, j = (int(x) for x in np.argwhere(~np.isfinite(arr.reshape(len(rows), -1)))[0])
    value = rows[i][j]
    raise BadRequest(
        f"{_where(i, j, schema)}: {value!r} is not a finite number, and model {model!r} "
        "does not accept NaN or infinity"
    )


def _to_array(values: list[Any], datatype: str, where: str) -> np.ndarray:
    try:
        # Values past the float range become inf here and are refused by the finite check.
        with np.errstate(over="ignore"):
            return np.array(values, dtype=numpy_dtype(datatype))
    except (OverflowError, ValueError) as e:
        raise BadRequest(f"{where}: values do not fit {datatype} ({e})") from None


def decode_features(manifest: Manifest, features: Any) -> dict[str, np.ndarray]:
    """``features`` (list of rows) -> the model's input tensors, or BadRequest naming the cell."""
    if type(features) is not list:
        raise BadRequest(f"features: expected a list of rows, got {_type_name(features)}")
    if not features:
        raise BadRequest("features: expected at least one row, got an empty list")
    schema = schema_of(manifest)
    if schema.matrix is not None:
        rows = _matrix_rows(features, schema)
        datatype = schema.matrix.datatype
        if datatype in _SMALL_FLOATS and _plain_small_floats(rows):
            # Every value a finite number well inside FP32's range: the cast cannot
            # overflow and the result is finite, so neither check has anything to find.
            return {schema.matrix.name: np.array(rows, dtype=schema.dtype)}
        arr = _to_array(rows, datatype, "features")
        if not allows_nan(manifest):
            _check_finite(arr, rows, schema, manifest.name)
        return {schema.matrix.name: arr}
    return _decode_columns(manifest, features, schema)


_SMALL_FLOATS = frozenset(("FP32", "FP64"))


def _plain_small_floats(rows: list[list[Any]]) -> bool:
    """True when every value is an int or float, finite and below ``_FP32_SAFE``.

    False means "not sure": the caller then takes the checked path. ``sum`` is NaN or
    infinite when any value is; ``min``/``max`` catch a large finite value (a NaN first
    in the row makes them NaN too, and NaN compares False).
    """
    issuperset = _NUMBER_TYPES.issuperset
    isfinite = math.isfinite
    for row in rows:
        if not row or not issuperset(map(type, row)):
            return False
        if not (min(row) > -_FP32_SAFE and max(row) < _FP32_SAFE and isfinite(sum(row))):
            return False
    return True


def _decode_columns(
    manifest: Manifest, features: list[Any], schema: Schema
) -> dict[str, np.ndarray]:
    """Column models: one input per column, each [-1, 1]; rows are objects (or lists)."""
    ncols = len(schema.columns)
    rows: list[list[Any]] = []
    for i, raw in enumerate(features):
        row = raw
        if type(raw) is dict:
            row = _dict_row_to_list(i, raw, schema)
        elif type(row) is list:
            if len(row) != ncols:
                raise BadRequest(
                    f"features[{i}]: expected {ncols} values ({schema.expected_columns}), got {len(row)}"
                )
        else:
            raise BadRequest(
                f"features[{i}]: expected an object with columns {schema.expected_columns}, "
                f"got {_type_name(row)}"
            )
        for j, v in enumerate(row):
            if not value_ok(v, schema.datatypes[j]):
                raise _bad_value(_where(i, j, schema), v, schema.datatypes[j])
        rows.append(row)
    inputs: dict[str, np.ndarray] = {}
    nan_ok = allows_nan(manifest)
    for j, spec in enumerate(schema.specs):
        column = [row[j] for row in rows]
        arr = _to_array(column, spec.datatype, f"features[*][{j}] ({spec.name})")
        if not nan_ok and arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
            i = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise BadRequest(
                f"{_where(i, j, schema)}: {column[i]!r} is not a finite number, and model "
                f"{manifest.name!r} does not accept NaN or infinity"
            )
        inputs[spec.name] = arr.reshape(-1, 1) if len(spec.shape) == 2 else arr
    return inputs


def one_per_row(arr: np.ndarray) -> list[Any]:
    """A [-1, 1] output (regressors) answers one value per row, not a list per row."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(-1)
    out: list[Any] = arr.tolist()
    return out


def probabilities_output(manifest: Manifest) -> str | None:
    """The manifest names it; packages that do not are read by the converter's convention."""
    name = manifest.probabilities_output
    if name is None and any(o.name == "probabilities" for o in manifest.outputs):
        name = "probabilities"
    return name


class Predictor:
    """The ``/predict`` codec over the inference core."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    def predict(
        self,
        body: Any,
        model: str | None = None,
        request_id: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """``request_id``: the X-Request-Id header; a ``request_id`` field in the body wins.
        ``key``: the X-Edge-Key header, which picks the arm of a traffic split."""
        if type(body) is not dict:
            raise BadRequest(
                f"body: expected a JSON object with 'features', got {_type_name(body)}"
            )
        if request_id is not None and "request_id" not in body:
            body["request_id"] = request_id
        loaded = self.core.route(self.core.registry.get(model), key)
        answer = self.core.infer(loaded, _decode, _encode, body)
        if body.get("request_id") is not None:
            answer["request_id"] = body["request_id"]
        return answer


def _decode(model: LoadedModel, body: dict[str, Any]) -> Call:
    manifest = model.manifest
    if not _BODY_KEYS.issuperset(body):
        unknown = [k for k in body if k not in _BODY_KEYS]
        raise BadRequest(
            f"{unknown[0]}: unknown field (expected 'features', 'probabilities', 'request_id')"
        )
    if "features" not in body:
        raise BadRequest("features: missing (expected a list of rows)")
    want_proba = body.get("probabilities", False)
    if type(want_proba) is not bool:
        raise BadRequest(f"probabilities: expected true or false, got {want_proba!r:.40}")
    wanted = [manifest.prediction_output]
    if want_proba:
        proba_name = probabilities_output(manifest)
        if proba_name is None:
            raise BadRequest(
                f"probabilities: model {manifest.name!r} has no probabilities output "
                "(it is not a classifier)"
            )
        wanted.append(proba_name)
    features = body["features"]
    request_id = body.get("request_id")
    if request_id is not None and (problem := payloads.request_id_problem(request_id)):
        raise BadRequest(f"request_id: {problem}")
    return Call(decode_features(manifest, features), wanted, features, request_id)


def _encode(model: LoadedModel, outputs: Tensors) -> Answer[dict[str, Any]]:
    manifest = model.manifest
    prediction = one_per_row(outputs[manifest.prediction_output])
    answer: dict[str, Any] = {
        "prediction": prediction,
        "model": manifest.name,
        "version": manifest.version,
    }
    recorded: dict[str, Any] = {"prediction": prediction}
    # Only asked-for outputs come back: more than one means probabilities were asked.
    proba_name = probabilities_output(manifest) if len(outputs) > 1 else None
    if proba_name is not None and proba_name in outputs:
        answer["probabilities"] = recorded["probabilities"] = outputs[proba_name].tolist()
        if manifest.classes is not None:
            answer["classes"] = manifest.classes
    return Answer(answer, recorded)
