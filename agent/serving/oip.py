"""The Open Inference Protocol core (KServe V2 / Triton HTTP): metadata, infer, binary data.

No sockets here. ``infer`` takes the request body and the value of the
``Inference-Header-Content-Length`` header and answers the response body and that
header's value, following Triton's binary tensor data extension: the JSON header
comes first, then the raw bytes of every input that names a ``binary_data_size``, in
input order. Fixed-size tensors are little-endian, row-major; BYTES tensors are each
element as a 4-byte little-endian length followed by its bytes. Outputs are sent the
same way when asked (``parameters.binary_data`` on an output, or
``parameters.binary_data_output`` on the request, which is what ``tritonclient``
sends when it names no outputs).

``model_config`` answers Triton's model configuration (``GET .../config``, which
``tritonclient``'s ``get_model_config`` reads), derived from the manifest.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent import __version__
from agent.models.runtime import LoadedModel
from agent.serving.codecs import parse_json
from agent.serving.core import Answer, Call, InferenceCore, Tensors
from agent.serving.predict import allows_nan, one_per_row
from agent.wire import payloads
from agent.wire.datatypes import FLOATS, expected_value, value_ok, wire_dtype
from agent.wire.errors import BadRequest
from agent.wire.manifest import TensorSpec

SERVER_NAME = "edge-agent"
EXTENSIONS = ["binary_tensor_data"]

# Triton's model configuration names for the protocol's datatypes (model_config.proto).
TRITON_DATATYPES: dict[str, str] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}

_LEN = struct.Struct("<I")
_NUMBERS = frozenset((int, float))


@dataclass(frozen=True)
class InferResponse:
    body: bytes
    json_length: int | None  # the Inference-Header-Content-Length, when binary data follows
    version: str = ""  # the version that answered (the canary's, in a traffic split)


def serialize_bytes(arr: np.ndarray) -> bytes:
    """A BYTES tensor on the wire: each element as <u32 length><bytes>, row-major."""
    parts: list[bytes] = []
    for v in arr.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(raw: bytes, count: int, where: str) -> np.ndarray:
    """Length-prefixed elements -> an object array of str (what onnxruntime takes)."""
    out: list[str] = []
    pos = 0
    view = memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(
                f"{where}: binary BYTES data ends inside the length of element {len(out)}"
            )
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(
                f"{where}: binary BYTES element {len(out)} claims {n} bytes, {len(raw) - pos} are left"
            )
        try:
            out.append(bytes(view[pos : pos + n]).decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"{where}: BYTES element {len(out)} is not UTF-8 text") from None
        pos += n
    if len(out) != count:
        raise BadRequest(
            f"{where}: binary data holds {len(out)} BYTES elements, the shape needs {count}"
        )
    return np.array(out, dtype=object)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested JSON lists (the protocol allows both forms)."""
    if not any(type(v) is list for v in data):
        return data
    flat: list[Any] = []
    for v in data:
        if type(v) is list:
            flat.extend(_flatten(v))
        else:
            flat.append(v)
    return flat


def _shape_fits(got: list[int], spec: list[int]) -> bool:
    return len(got) == len(spec) and all(s < 0 or g == s for g, s in zip(got, spec, strict=True))


class OpenInference:
    """What the /v2 routes call."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    # --- metadata and health ---------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def ready(self) -> bool:
        return self.core.ready()

    def model(self, name: str, version: str | None) -> LoadedModel:
        return self.core.model_by_name(name, version)

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        m = self.model(name, version).manifest
        return {
            "name": m.name,
            "versions": [m.version],
            "platform": "onnx",
            "inputs": [s.to_dict() for s in m.inputs],
            "outputs": [s.to_dict() for s in m.outputs],
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration, as much of it as the manifest says.

        ``max_batch_size`` is 0: the batch dimension is part of ``dims`` (-1), as in
        the manifest's shapes.
        """
        m = self.model(name, version).manifest

        def tensors(specs: list[TensorSpec]) -> list[dict[str, Any]]:
            return [
                {"name": s.name, "data_type": TRITON_DATATYPES[s.datatype], "dims": list(s.shape)}
                for s in specs
            ]

        return {
            "name": m.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [m.version]}},
            "max_batch_size": 0,
            "input": tensors(m.inputs),
            "output": tensors(m.outputs),
        }

    # --- infer -----------------------------------------------------------------------

    def infer(
        self,
        name: str,
        version: str | None,
        body: bytes,
        header_length: int | None,
        key: str | None = None,
    ) -> InferResponse:
        if header_length is not None and not 0 < header_length <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length: {header_length} is not within the body "
                f"of {len(body)} bytes"
            )
        head = body if header_length is None else body[:header_length]
        request = parse_json(head, "inference header" if header_length else "body")
        if type(request) is not dict:
            raise BadRequest("body: expected a JSON object with 'inputs'")
        model = self.model(name, version)
        if version is None:  # a version in the path pins it; otherwise the split decides
            model = self.core.route(model, key)
        tail = memoryview(body)[header_length or len(body) :]
        wanted: list[tuple[str, bool]] = []

        def decode(m: LoadedModel, _: Any) -> Call:
            request_id = request.get("id")
            if "id" in request and type(request_id) is not str:
                raise BadRequest(
                    f"id: expected a string, got {json.dumps(request['id'], default=repr):.60}"
                )
            # An empty id is echoed (the protocol allows it) but names no request.
            request_id = request_id or None
            if request_id is not None and (problem := payloads.request_id_problem(request_id)):
                raise BadRequest(f"id: {problem}")
            inputs, given = self._inputs(m, request, tail)
            wanted.extend(self._outputs(m, request))
            return Call(inputs, [o for o, _ in wanted], given, request_id)

        def encode(m: LoadedModel, outputs: Tensors) -> Answer[InferResponse]:
            return Answer(self._encode(m, request, wanted, outputs), _recorded(m, outputs))

        answer = self.core.infer(model, decode, encode)
        return InferResponse(answer.body, answer.json_length, model.version)

    def _inputs(
        self, model: LoadedModel, request: dict[str, Any], tail: memoryview
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        items = request.get("inputs")
        if type(items) is not list or not items:
            raise BadRequest("inputs: expected a non-empty list of input tensors")
        specs = {s.name: s for s in model.manifest.inputs}
        nan_ok = allows_nan(model.manifest)
        arrays: dict[str, np.ndarray] = {}
        given: dict[str, Any] = {}
        offset = 0
        for i, item in enumerate(items):
            if type(item) is not dict:
                raise BadRequest(f"inputs[{i}]: expected an object with name, shape, datatype")
            tname = item.get("name")
            spec = specs.get(tname) if type(tname) is str else None
            if spec is None:
                raise BadRequest(
                    f"inputs[{i}].name: {tname!r} is not an input of model "
                    f"{model.manifest.name!r} (inputs: {', '.join(specs)})"
                )
            if spec.name in arrays:
                raise BadRequest(f"inputs[{i}] ({spec.name}): given twice")
            arr, used = self._tensor(
                i, spec, item, tail, offset, nan_ok=nan_ok, model=model.manifest.name
            )
            offset += used
            arrays[spec.name] = arr
            given[spec.name] = item["data"] if "data" in item else arr.tolist()
        missing = [n for n in specs if n not in arrays]
        if missing:
            raise BadRequest(
                f"inputs: missing input {missing[0]!r} of model {model.manifest.name!r}"
            )
        if offset != len(tail):
            raise BadRequest(
                f"binary data: {len(tail)} bytes follow the inference header, the inputs' "
                f"binary_data_size add up to {offset}"
            )
        return arrays, given

    def _tensor(
        self,
        i: int,
        spec: TensorSpec,
        item: dict[str, Any],
        tail: memoryview,
        offset: int,
        *,
        nan_ok: bool,
        model: str,
    ) -> tuple[np.ndarray, int]:
        """One input tensor and how many binary bytes it used."""
        where = f"inputs[{i}] ({spec.name})"
        datatype = item.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(f"{where}: datatype {datatype!r}, expected {spec.datatype!r}")
        shape = item.get("shape")
        if (
            type(shape) is not list
            or not all(type(d) is int and d >= 0 for d in shape)
            or not _shape_fits(shape, spec.shape)
        ):
            raise BadRequest(f"{where}: expected shape {spec.shape}, got {shape!r:.60}")
        count = 1
        for d in shape:
            count *= d
        params = item.get("parameters") or {}
        if type(params) is not dict:
            raise BadRequest(f"{where}.parameters: expected an object, got {params!r:.40}")
        size = params.get("binary_data_size")
        used = 0
        if size is not None:
            if type(size) is not int or size < 0:
                raise BadRequest(f"{where}: binary_data_size {size!r} is not a byte count")
            if "data" in item:
                raise BadRequest(f"{where}: has both 'data' and binary_data_size; send one")
            if offset + size > len(tail):
                raise BadRequest(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(tail) - offset} bytes left)"
                )
            raw = tail[offset : offset + size]
            used = size
            if datatype == "BYTES":
                arr = deserialize_bytes(bytes(raw), count, where)
            else:
                dtype = wire_dtype(spec.datatype)
                if size != count * dtype.itemsize:
                    raise BadRequest(
                        f"{where}: binary_data_size is {size} bytes, shape {shape} of "
                        f"{spec.datatype} needs {count * dtype.itemsize}"
                    )
                arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        else:
            data = item.get("data")
            if type(data) is not list:
                raise BadRequest(f"{where}.data: expected a list of values (or binary_data_size)")
            flat = _flatten(data)
            if len(flat) != count:
                raise BadRequest(
                    f"{where}: data has {len(flat)} values, shape {shape} needs {count}"
                )
            if not (spec.datatype in FLOATS and _NUMBERS.issuperset(map(type, flat))):
                for j, v in enumerate(flat):
                    if not value_ok(v, spec.datatype):
                        raise BadRequest(
                            f"{where}.data[{j}]: expected {expected_value(spec.datatype)}, got {v!r:.60}"
                        )
            try:
                with np.errstate(over="ignore"):  # past the range: inf, refused below
                    arr = np.array(
                        flat, dtype=object if datatype == "BYTES" else wire_dtype(datatype)
                    )
            except (OverflowError, ValueError) as e:
                raise BadRequest(f"{where}.data: values do not fit {datatype} ({e})") from None
        if not nan_ok and arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
            j = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise BadRequest(
                f"{where}: element {j} is {arr[j]}, and model {model!r} does not accept "
                "NaN or infinity"
            )
        return arr.reshape(shape), used

    def _outputs(self, model: LoadedModel, request: dict[str, Any]) -> list[tuple[str, bool]]:
        """Requested outputs (default: all) with whether each goes back as binary data."""
        params = request.get("parameters") or {}
        if type(params) is not dict:
            raise BadRequest(f"parameters: expected an object, got {params!r:.40}")
        default_binary = params.get("binary_data_output", False)
        if type(default_binary) is not bool:
            raise BadRequest(
                f"parameters.binary_data_output: expected true or false, got {default_binary!r:.40}"
            )
        names = [s.name for s in model.manifest.outputs]
        requested = request.get("outputs")
        if requested is None or requested == []:  # none named: all, as when absent
            return [(n, default_binary) for n in names]
        if type(requested) is not list:
            raise BadRequest("outputs: expected a list of {name, parameters}")
        wanted: list[tuple[str, bool]] = []
        for i, out in enumerate(requested):
            oname = out.get("name") if type(out) is dict else None
            if oname not in names:
                raise BadRequest(
                    f"outputs[{i}].name: {oname!r} is not an output of model "
                    f"{model.manifest.name!r} (outputs: {', '.join(names)})"
                )
            oparams = out.get("parameters") or {}
            if type(oparams) is not dict:
                raise BadRequest(f"outputs[{i}].parameters: expected an object")
            if oparams.get("classification"):
                raise BadRequest(f"outputs[{i}].parameters.classification: not supported")
            binary = oparams.get("binary_data", default_binary)
            if type(binary) is not bool:
                raise BadRequest(f"outputs[{i}].parameters.binary_data: expected true or false")
            wanted.append((oname, binary))
        return wanted

    def _encode(
        self,
        model: LoadedModel,
        request: dict[str, Any],
        wanted: list[tuple[str, bool]],
        outputs: dict[str, np.ndarray],
    ) -> InferResponse:
        specs = {s.name: s for s in model.manifest.outputs}
        blobs: list[bytes] = []
        tensors: list[dict[str, Any]] = []
        for name, binary in wanted:
            arr = outputs[name]
            datatype = specs[name].datatype
            tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
            if binary:
                raw = (
                    serialize_bytes(arr)
                    if datatype == "BYTES"
                    else np.ascontiguousarray(arr, dtype=wire_dtype(datatype)).tobytes()
                )
                tensor["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                tensor["data"] = arr.reshape(-1).tolist()
            tensors.append(tensor)
        answer: dict[str, Any] = {
            "model_name": model.manifest.name,
            "model_version": model.manifest.version,
            "outputs": tensors,
        }
        if "id" in request:
            answer["id"] = request["id"]
        head = json.dumps(answer, separators=(",", ":")).encode()
        if not blobs:
            return InferResponse(head, None)
        return InferResponse(b"".join([head, *blobs]), len(head))


def _recorded(model: LoadedModel, outputs: Tensors) -> dict[str, Any]:
    """The outputs as the result buffer keeps them, in the shape ``/predict`` records:
    the prediction output as ``prediction`` (one value per row, which the collector
    compares with ground truth), the other outputs asked for under their own names."""
    pred = model.manifest.prediction_output
    recorded: dict[str, Any] = {}
    for name, arr in outputs.items():
        if name == pred:
            recorded["prediction"] = one_per_row(arr)
        else:
            recorded[name] = arr.tolist()
    return recorded
