"""The Open Inference Protocol datatypes: one table for every side.

Each row says how a datatype travels (its little-endian numpy form in binary tensor
data), what numpy holds it in, which onnxruntime tensor type it is, and whether the
agent serves it. The manifest validator, both request codecs, the runtime's schema
check and ``edge-model verify`` all read this table and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

# numpy is imported on first use, not with the table: the central side (fleet/, the
# edge-fleet image of deploy/) validates manifests against this table and has no numpy.
if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Datatype:
    name: str
    kind: str  # "float", "int", "bool" or "bytes"
    wire: str  # numpy dtype string of binary tensor data ("O" for BYTES: length-prefixed)
    ort: str  # onnxruntime's tensor type name
    served: bool  # whether the agent serves models with tensors of this type

    @property
    def numpy(self) -> Any:
        import numpy as np

        return object if self.kind == "bytes" else np.dtype(self.wire).newbyteorder("=").type


_ROWS = [
    Datatype("BOOL", "bool", "?", "tensor(bool)", True),
    Datatype("UINT8", "int", "u1", "tensor(uint8)", False),
    Datatype("UINT16", "int", "<u2", "tensor(uint16)", False),
    Datatype("UINT32", "int", "<u4", "tensor(uint32)", False),
    Datatype("UINT64", "int", "<u8", "tensor(uint64)", False),
    Datatype("INT8", "int", "i1", "tensor(int8)", False),
    Datatype("INT16", "int", "<i2", "tensor(int16)", False),
    Datatype("INT32", "int", "<i4", "tensor(int32)", True),
    Datatype("INT64", "int", "<i8", "tensor(int64)", True),
    # FP16 is a valid manifest type, but the agent does not serve it: the device refuses
    # such a package, and so does `edge-model verify`, which judges as the device does.
    Datatype("FP16", "float", "<f2", "tensor(float16)", False),
    Datatype("FP32", "float", "<f4", "tensor(float)", True),
    Datatype("FP64", "float", "<f8", "tensor(double)", True),
    Datatype("BYTES", "bytes", "O", "tensor(string)", True),
]
TABLE: dict[str, Datatype] = {d.name: d for d in _ROWS}
DATATYPES = frozenset(TABLE)
SERVED = frozenset(d.name for d in _ROWS if d.served)
FLOATS = frozenset(d.name for d in _ROWS if d.kind == "float")
INTS = frozenset(d.name for d in _ROWS if d.kind == "int")


# Looked up on every request: computed once per datatype (an unknown one raises KeyError).
@cache
def numpy_dtype(datatype: str) -> Any:
    """The numpy type a tensor of ``datatype`` is held in (``object`` for BYTES)."""
    return TABLE[datatype].numpy


@cache
def wire_dtype(datatype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of ``datatype`` in binary tensor data (not BYTES)."""
    import numpy as np

    return np.dtype(TABLE[datatype].wire)


def expected_value(datatype: str) -> str:
    """How an error message names a value of ``datatype``."""
    kind = TABLE[datatype].kind
    return {"float": "a number", "int": "an integer", "bytes": "a string"}.get(
        kind, "true or false"
    )


def value_ok(v: Any, datatype: str) -> bool:
    """Whether a JSON value fits a tensor datatype; bools are never numbers here."""
    t = type(v)
    kind = TABLE[datatype].kind
    if kind == "float":
        return t is float or t is int
    if kind == "int":
        return t is int or (t is float and v.is_integer())
    if kind == "bytes":
        return t is str
    return t is bool


def to_array(values: Any, datatype: str) -> np.ndarray:
    """JSON values -> a numpy array of the tensor's datatype (BYTES: an object array of str)."""
    import numpy as np

    if datatype == "BYTES":
        arr = np.array(values, dtype=object)
        flat = arr.reshape(-1)
        for i, v in enumerate(flat):
            if isinstance(v, bytes):
                flat[i] = v.decode("utf-8")
            elif not isinstance(v, str):
                flat[i] = str(v)
        return arr
    return np.asarray(values, dtype=numpy_dtype(datatype))
