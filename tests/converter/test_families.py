"""Every supported estimator family converts, passes parity, verifies, and predicts like sklearn."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from agent.models.runtime import check_parity, load_model
from agent.wire.signing import load_private_key
from converter.package import build
from converter.verify import verify
from tests.converter.families import FAMILIES, Family, fitted
from tests.fixtures.models import Keypair

DOCS = Path(__file__).resolve().parents[2] / "docs" / "converter.md"


def _feeds(manifest_inputs: list[Any], x: Any) -> dict[str, np.ndarray]:
    """What a client of the package feeds, built from the manifest alone."""
    if len(manifest_inputs) == 1 and manifest_inputs[0].name == "input":
        return {"input": np.asarray(x, dtype=np.float32)}
    feeds = {}
    for spec in manifest_inputs:
        column = x[spec.name].to_numpy().reshape(-1, 1)
        feeds[spec.name] = (
            column.astype(str).astype(object)
            if spec.datatype == "BYTES"
            else column.astype(np.float32)
        )
    return feeds


def _sklearn_prediction(model: Any, task: str, x: Any) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(model.transform(x) if task == "transformer" else model.predict(x))


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_converts_verifies_and_predicts_like_sklearn(
    family: Family, tmp_path: Path, keypair: Keypair
) -> None:
    model, x = fitted(family)
    # The CLI default: parity on generated rows of the inferred schema.
    result = build(
        model,
        name="m",
        version="1.0.0",
        out_dir=tmp_path,
        private_key=load_private_key(keypair.key),
    )
    assert result.parity.ok

    verified = verify(tmp_path, [keypair.pub])
    assert verified.key_id is not None
    assert 8 <= verified.parity_rows <= 16
    # The device's own loader and parity check accept it (the seam with agent/runtime.py).
    check_parity(load_model(tmp_path, verified.manifest))

    # Independently of the converter's own check: the package on the training rows.
    m = verified.manifest
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run([m.prediction_output], _feeds(m.inputs, x))[0]
    want = _sklearn_prediction(model, m.raw["task"], x)
    if m.raw["task"] in {"classifier", "cluster", "outlier"}:
        agree = float(np.mean(got.reshape(-1) == want.reshape(-1)))
        # A label may flip only on a near tie; one in a hundred rows at most.
        assert agree >= 0.99, f"{family.name}: labels agree on {agree:.1%} of rows"
    else:
        np.testing.assert_allclose(
            got.reshape(want.shape), want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max())
        )


def test_support_table_in_docs_lists_every_family() -> None:
    text = DOCS.read_text()
    rows = set(re.findall(r"^\| ([^|]+?) \|", text, flags=re.MULTILINE))
    missing = [f.name for f in FAMILIES if f.name not in rows]
    assert not missing, f"docs/converter.md support table lacks {missing}"
