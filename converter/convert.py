"""scikit-learn -> ONNX with skl2onnx: opsets, zipmap off, outputs and task.

Classifiers are always converted with ``zipmap=False``: ZipMap turns probabilities
into a list of dicts, is not a tensor the Open Inference Protocol can describe and
is about 15 times slower. ``target_opset`` is always an explicit dict: skl2onnx
otherwise picks ``ai.onnx.ml`` 4+, which its own IsolationForest converter refuses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from agent.wire.errors import ConversionError
from agent.wire.manifest import TensorSpec

from converter.schema import InputSchema

# Highest default-domain opset each onnxruntime release runs (onnxruntime's
# docs/Versioning.md). skl2onnx 1.20 is tested up to 22.
_ORT_OPSET = {(1, 17): 20, (1, 18): 21, (1, 19): 21, (1, 20): 21, (1, 21): 22}
_SKL2ONNX_MAX_OPSET = 22
# ai.onnx.ml 3 has every operator scikit-learn models need and every onnxruntime
# since 1.7 runs it; 4 and 5 add nothing we use and IsolationForest refuses them.
ML_OPSET = 3

_ONNX_TO_OIP = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
}


def target_opset(onnxruntime_version: str | None = None) -> dict[str, int]:
    """The opsets to convert to: the newest the installed onnxruntime runs."""
    if onnxruntime_version is None:
        import onnxruntime

        onnxruntime_version = onnxruntime.__version__
    major, minor = (int(p) for p in onnxruntime_version.split(".")[:2])
    if (major, minor) < (1, 17):
        raise ConversionError(
            f"onnxruntime {onnxruntime_version}: too old, the converter needs >= 1.17"
        )
    opset = _ORT_OPSET.get((major, minor), _SKL2ONNX_MAX_OPSET)
    return {"": min(opset, _SKL2ONNX_MAX_OPSET), "ai.onnx.ml": ML_OPSET}


def task_of(estimator: Any) -> str:
    """classifier, regressor, cluster, outlier or transformer."""
    from sklearn.base import is_classifier, is_outlier_detector, is_regressor

    if is_classifier(estimator):
        return "classifier"
    if is_regressor(estimator):
        return "regressor"
    if is_outlier_detector(estimator):
        return "outlier"
    if getattr(estimator, "_estimator_type", None) == "clusterer" or hasattr(
        _final(estimator), "cluster_centers_"
    ):
        return "cluster"
    if hasattr(estimator, "transform"):
        return "transformer"
    raise ConversionError(
        f"model: {type(estimator).__name__} is neither a classifier, regressor, "
        "clusterer, outlier detector nor transformer"
    )


def _final(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[-1][1] if steps else estimator


def check_fitted(estimator: Any) -> None:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not hasattr(estimator, "fit"):
        raise ConversionError(
            f"model: a {type(estimator).__name__}, not a scikit-learn estimator or Pipeline"
        )
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise ConversionError(
            f"model: {type(estimator).__name__} is not fitted; call fit() before saving it"
        ) from None
    except TypeError as e:
        raise ConversionError(f"model: {type(estimator).__name__}: {e}") from None


def _classifier_options(estimator: Any) -> dict[int, dict[str, Any]]:
    """zipmap=False on every classifier in the tree, keyed by id as skl2onnx wants."""
    from sklearn.base import is_classifier

    options: dict[int, dict[str, Any]] = {}
    stack = [estimator]
    while stack:
        est = stack.pop()
        steps = getattr(est, "steps", None)
        if steps:
            stack.extend(step for _, step in steps)
        elif is_classifier(est):
            options[id(est)] = {"zipmap": False}
    return options


@dataclass(frozen=True)
class Converted:
    model: Any  # onnx.ModelProto
    outputs: list[TensorSpec]
    opset: dict[str, int]


def _initial_types(schema: InputSchema) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import (
        DoubleTensorType,
        FloatTensorType,
        Int64TensorType,
        StringTensorType,
    )

    kinds = {
        "FP32": FloatTensorType,
        "FP64": DoubleTensorType,
        "INT64": Int64TensorType,
        "BYTES": StringTensorType,
    }
    return [(spec.name, kinds[spec.datatype]([None, *spec.shape[1:]])) for spec in schema.inputs]


def convert(estimator: Any, schema: InputSchema, opset: dict[str, int] | None = None) -> Converted:
    """Convert a fitted estimator; any skl2onnx refusal becomes one ConversionError line."""
    from skl2onnx import convert_sklearn

    opset = dict(opset or target_opset())
    name = type(_final(estimator)).__name__
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_sklearn(
                estimator,
                initial_types=_initial_types(schema),
                target_opset=opset,
                options=_classifier_options(estimator),
            )
    except Exception as e:  # skl2onnx raises bare RuntimeError/TypeError/... for refusals
        raise ConversionError(_explain(estimator, name, e)) from e
    return Converted(model, graph_outputs(model), opset)


def _explain(estimator: Any, name: str, error: Exception) -> str:
    text = " ".join(str(error).split())
    if "shape calculator" in text or "converter" in text.lower():
        unsupported = _unsupported_step(estimator) or name
        return (
            f"model: skl2onnx cannot convert {unsupported}; replace it with a supported "
            "estimator (see docs/converter.md) or register a custom skl2onnx converter"
        )
    return f"model: converting {name} failed: {type(error).__name__}: {text[:300]}"


def _unsupported_step(estimator: Any) -> str | None:
    """The first step, depth first in pipeline order, that skl2onnx has no converter for."""
    # skl2onnx keeps its registry of converted classes here (private, stable since 1.7).
    from skl2onnx._supported_operators import sklearn_operator_name_map

    stack = [estimator]
    while stack:
        est = stack.pop(0)
        if type(est) not in sklearn_operator_name_map:
            return type(est).__name__
        children = [
            item[1]
            for attr in ("steps", "transformers_")
            for item in getattr(est, attr, None) or []
            if not isinstance(item[1], str)
        ]
        stack[:0] = children
    return None


def graph_outputs(model: Any) -> list[TensorSpec]:
    """Output tensors of an ONNX graph as manifest specs (-1 for unknown dimensions)."""
    specs = []
    for out in model.graph.output:
        tensor = out.type.tensor_type
        datatype = _ONNX_TO_OIP.get(tensor.elem_type)
        if datatype is None:
            raise ConversionError(
                f"output {out.name!r}: ONNX element type {tensor.elem_type} has no "
                "Open Inference Protocol datatype"
            )
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        specs.append(TensorSpec(out.name, datatype, shape))
    return specs


def json_values(values: Any) -> list[Any]:
    """numpy -> plain JSON values (str, int, float, bool), nested as the array is."""
    array = np.asarray(values)
    if array.dtype.kind in "OUS":
        return np.vectorize(str, otypes=[object])(array).tolist()  # type: ignore[no-any-return]
    return array.tolist()  # type: ignore[no-any-return]
