"""The reference profile of the training sample, for the device's drift summaries.

Only a sample the user gave is profiled: generated rows follow the schema, not the
data, so a profile of them would report drift on every real input. The binning rule
and the manifest format are ``agent/wire/profile.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from agent.wire.profile import build_profile

from converter.schema import Batch, InputSchema

_NUMBERS = {"FP32", "FP64", "INT64"}


def sample_profile(
    schema: InputSchema,
    batch: Batch,
    outputs: dict[str, np.ndarray],
    prediction_output: str,
    classes: Sequence[Any] | None,
) -> dict[str, Any]:
    """Per numeric feature decile bins, and the prediction output's distribution, of the
    sample rows as the ONNX graph answered them. String columns are not profiled."""
    columns: list[tuple[str, str, int, np.ndarray]] = []
    for spec in schema.inputs:
        if spec.datatype not in _NUMBERS:
            continue
        values = np.asarray(batch[spec.name], dtype=np.float64)
        if schema.by_column:
            columns.append((spec.name, spec.name, 0, values.reshape(-1)))
            continue
        names = schema.feature_names or [f"x{i}" for i in range(values.shape[1])]
        columns += [(names[i], spec.name, i, values[:, i]) for i in range(values.shape[1])]
    predicted = outputs.get(prediction_output)
    output = None if predicted is None else (prediction_output, predicted, classes)
    return build_profile(columns, output)
