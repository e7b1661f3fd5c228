"""The manifest the converter writes, and the parity check's verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from agent.models.runtime import check_parity, load_model
from agent.wire.errors import ConversionError, ParityFailed
from agent.wire.manifest import DEFAULT_CHUNK_SIZE, parse_manifest
from agent.wire.package import verify_package
from agent.wire.signing import key_id, load_public_key
from converter.convert import target_opset
from converter.package import build, build_package
from converter.parity import compare
from converter.verify import verify
from tests.fixtures.models import Keypair


def manifest_of(package: Path) -> dict[str, Any]:
    return json.loads((package / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_iris_manifest_holds_what_the_device_needs(iris_package: Path, keypair: Keypair) -> None:
    m = manifest_of(iris_package)
    parsed = parse_manifest(m)
    assert (parsed.name, parsed.version, parsed.serial) == ("iris", "1.0.0", 1)
    assert m["task"] == "classifier"
    assert m["prediction_output"] == "label" and m["probabilities_output"] == "probabilities"
    assert m["classes"] == ["setosa", "versicolor", "virginica"]
    assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert m["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    art = m["artifact"]
    assert art["file"] == "model.onnx" and art["chunk_size"] == DEFAULT_CHUNK_SIZE
    assert art["size"] == (iris_package / "model.onnx").stat().st_size and art["chunks"] == 1
    assert set(m["runtime"]) >= {"opset", "onnxruntime", "sklearn", "skl2onnx", "onnx"}
    assert m["runtime"]["opset"]["ai.onnx.ml"] <= 3
    assert m["signature"]["key_id"] == key_id(load_public_key(keypair.pub))
    trusted = {m["signature"]["key_id"]: load_public_key(keypair.pub)}
    verify_package(iris_package, trusted, require_signature=True)


def test_parity_block_reproduces_on_onnxruntime(iris_package: Path) -> None:
    """The device's check, done by hand: feed `inputs` as FP32, compare to `expected`."""
    parity = manifest_of(iris_package)["parity"]
    assert 8 <= len(parity["inputs"]["input"]) <= 16
    assert parity["exact"] == ["label"] and 0 < parity["atol"] <= 1e-3
    session = onnxruntime.InferenceSession(str(iris_package / "model.onnx"))
    feed = np.asarray(parity["inputs"]["input"], dtype=np.float32)
    label, proba = session.run(["label", "probabilities"], {"input": feed})
    assert label.tolist() == parity["expected"]["label"]
    np.testing.assert_allclose(
        proba, parity["expected"]["probabilities"], rtol=parity["rtol"], atol=parity["atol"]
    )


def test_versions_and_serials_of_fixture_packages(
    iris_package_v2: Path, regressor_package: Path, rf_package: Path
) -> None:
    v2 = manifest_of(iris_package_v2)
    assert (v2["name"], v2["version"], v2["serial"]) == ("iris", "1.1.0", 2)
    ridge = manifest_of(regressor_package)
    assert ridge["task"] == "regressor" and ridge["prediction_output"] == "variable"
    assert "probabilities_output" not in ridge and "classes" not in ridge
    assert ridge["inputs"][0]["shape"] == [-1, 5]
    rf = manifest_of(rf_package)
    assert rf["classes"] == [0, 1] and rf["inputs"][0]["shape"] == [-1, 20]


def test_column_inputs_are_named_after_columns(columns_package: Path) -> None:
    m = manifest_of(columns_package)
    assert m["inputs"] == [
        {"name": "age", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "city", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    assert m["feature_names"] == ["age", "city"]
    cities = [row[0] for row in m["parity"]["inputs"]["city"]]
    assert all(isinstance(c, str) for c in cities)
    assert verify(columns_package).parity_rows >= 8


def test_unsigned_package_has_no_signature(
    make_package: Any, regressor_estimator: Any, tmp_path: Path
) -> None:
    package = make_package(regressor_estimator, "ridge", "2.0.0", sign=False)
    assert "signature" not in manifest_of(package)
    assert verify(package).key_id is None


def test_opset_follows_the_installed_onnxruntime() -> None:
    assert target_opset("1.17.3") == {"": 20, "ai.onnx.ml": 3}
    assert target_opset("1.32.0") == {"": 22, "ai.onnx.ml": 3}
    with pytest.raises(ConversionError, match="too old"):
        target_opset("1.16.0")


# --- float32 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offset_model() -> tuple[Any, np.ndarray]:
    """A linear model on raw features around 1e6: float32 cannot hold them precisely."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5)) + 1e6
    y = (x[:, 0] + x[:, 1] - 2e6 > 0).astype(int)
    sample = rng.normal(size=(20000, 5)) + 1e6
    return LogisticRegression(max_iter=1000).fit(x, y), sample


def test_float32_label_flips_are_refused_with_advice(
    offset_model: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    model, sample = offset_model
    with pytest.raises(ParityFailed) as caught:
        build_package(model, name="big", version="1.0", out_dir=tmp_path / "p", sample=sample)
    message = str(caught.value)
    assert "label differs on" in message and "of 20000 rows" in message
    assert "float32" in message and "--double" in message and "centre and scale" in message
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_double_graph_keeps_large_features_exact(
    offset_model: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    model, sample = offset_model
    result = build(model, name="big", version="1.0", out_dir=tmp_path, sample=sample, double=True)
    assert result.parity.ok
    assert result.manifest["inputs"][0]["datatype"] == "FP64"
    verified = verify(tmp_path)
    assert verified.parity_rows >= 8
    check_parity(load_model(tmp_path, verified.manifest))  # the device runs FP64 too


def test_compare_names_the_worst_row() -> None:
    expected = {"label": np.array([0, 1, 1, 0]), "probabilities": np.full((4, 2), 0.5)}
    actual = {"label": np.array([0, 1, 0, 0]), "probabilities": np.full((4, 2), 0.5)}
    actual["probabilities"][3, 1] = 0.52
    result = compare(expected, actual, exact=["label"], skip=np.zeros(4, dtype=bool))
    assert not result.ok
    assert result.outputs["label"].worst_rows == [2]
    assert result.outputs["probabilities"].worst_rows == [3]
    assert result.failed_rows.tolist() == [False, False, True, True]
    within = {"label": expected["label"], "probabilities": expected["probabilities"] + 5e-5}
    assert compare(expected, within, exact=["label"], skip=np.zeros(4, dtype=bool)).ok


def test_sample_rows_with_text_in_a_numeric_model(iris_estimator: Any, tmp_path: Path) -> None:
    sample = np.array([["1", "2", "x", "4"]])
    with pytest.raises(ConversionError, match="sample: not all values are numbers"):
        build_package(iris_estimator, name="i", version="1", out_dir=tmp_path, sample=sample)


def test_not_an_estimator_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not a scikit-learn estimator"):
        build_package(object(), name="i", version="1", out_dir=tmp_path)


def test_same_model_gives_the_same_artifact(iris_estimator: Any, tmp_path: Path) -> None:
    """Reproducible builds: republishing an unchanged model reuses its chunks by sha256."""
    first = build(iris_estimator, name="iris", version="1.0", out_dir=tmp_path / "a")
    second = build(iris_estimator, name="iris", version="1.1", out_dir=tmp_path / "b")
    assert first.manifest["artifact"]["sha256"] == second.manifest["artifact"]["sha256"]


def test_dataframe_fitted_numeric_model_records_feature_names(
    regression_data: Any, tmp_path: Path
) -> None:
    import pandas as pd
    from sklearn.linear_model import Ridge

    x, y = regression_data
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d", "e"])
    model = Ridge().fit(frame, y)
    result = build(model, name="r", version="1", out_dir=tmp_path / "gen")
    assert result.manifest["feature_names"] == ["a", "b", "c", "d", "e"]
    assert result.manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}]
    csv = tmp_path / "rows.csv"
    frame.to_csv(csv, index=False)
    assert build(model, name="r", version="1", out_dir=tmp_path / "csv", sample=csv).parity.ok
    with pytest.raises(ConversionError, match=r"missing \['e'\]"):
        build(model, name="r", version="1", out_dir=tmp_path / "x", sample=frame.iloc[:, :4])


def test_column_transformer_on_array_columns(regression_data: Any, tmp_path: Path) -> None:
    """Index-selected numeric columns make one input; string ones need names to be inputs."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    x, y = regression_data
    ct = ColumnTransformer([("s", StandardScaler(), [0, 1])], remainder="passthrough")
    model = make_pipeline(ct, Ridge()).fit(x, y)
    result = build(model, name="r", version="1", out_dir=tmp_path / "ok")
    assert result.parity.ok
    assert result.manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}]

    words = np.array([["a"], ["b"], ["c"]] * 20, dtype=object)
    strings = make_pipeline(ColumnTransformer([("o", OneHotEncoder(), [0])]), Ridge())
    strings.fit(words, np.arange(60.0))
    with pytest.raises(ConversionError, match="fit it on a pandas DataFrame"):
        build(strings, name="r", version="1", out_dir=tmp_path / "no")
