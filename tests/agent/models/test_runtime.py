"""The runtime: load an ONNX version, refuse what cannot be served, parity, run."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.models.runtime import check_parity, load_model
from agent.wire.datatypes import to_array
from agent.wire.errors import BadRequest, ModelLoadFailed, ParityFailed, SchemaUnsupported
from agent.wire.manifest import Manifest, parse_manifest
from agent.wire.package import read_manifest, write_manifest


def edited(package: Path, dest: Path, edit: Any) -> tuple[Path, Manifest]:
    """A copy of the package whose manifest ``edit(raw)`` changed."""
    out = dest / "edited"
    shutil.copytree(package, out)
    raw = read_manifest(out).unsigned_dict()
    edit(raw)
    write_manifest(out, raw)
    return out, parse_manifest(raw)


def test_loads_runs_and_passes_its_own_parity(iris_package: Path) -> None:
    manifest = read_manifest(iris_package)
    model = load_model(iris_package, manifest, intra_op_threads=1, inter_op_threads=1)
    check_parity(model)
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    out = model.run({manifest.inputs[0].name: x})
    assert list(out["label"]) == ["setosa", "virginica"]
    assert out["probabilities"].shape == (2, 3)
    assert np.allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    only = model.run({manifest.inputs[0].name: x}, ["label"])
    assert list(only) == ["label"]


@pytest.mark.parametrize(
    "package",
    ["iris_package", "iris_package_v2", "regressor_package", "columns_package", "rf_package"],
)
def test_every_converter_package_passes_its_parity_on_this_device(
    package: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(package)
    check_parity(load_model(folder, read_manifest(folder)))


def test_named_columns_model_takes_bytes_and_fp32(columns_package: Path) -> None:
    manifest = read_manifest(columns_package)
    model = load_model(columns_package, manifest)
    check_parity(model)
    datatypes = {s.name: s.datatype for s in manifest.inputs}
    assert "BYTES" in datatypes.values()


def test_tampered_parity_expectation_fails_naming_output_and_row(
    tmp_path: Path, iris_package: Path
) -> None:
    def flip_row_3(raw: dict[str, Any]) -> None:
        probs = raw["parity"]["expected"]["probabilities"]
        probs[3] = [1.0 - p for p in probs[3]]

    folder, manifest = edited(iris_package, tmp_path, flip_row_3)
    model = load_model(folder, manifest)
    with pytest.raises(ParityFailed, match=r"output 'probabilities' row 3: got \[.*expected \["):
        check_parity(model)


def test_tampered_label_fails_exactly(tmp_path: Path, iris_package: Path) -> None:
    def wrong_label(raw: dict[str, Any]) -> None:
        raw["parity"]["expected"]["label"][0] = "not-a-flower"

    folder, manifest = edited(iris_package, tmp_path, wrong_label)
    with pytest.raises(
        ParityFailed, match=r"output 'label' row 0: got '\w+', expected 'not-a-flower'"
    ):
        check_parity(load_model(folder, manifest))


def test_missing_parity_block_is_refused(tmp_path: Path, iris_package: Path) -> None:
    folder, manifest = edited(iris_package, tmp_path, lambda raw: raw.pop("parity"))
    model = load_model(folder, manifest)  # warm-up works without parity rows
    with pytest.raises(ParityFailed, match="no parity"):
        check_parity(model)


def test_manifest_datatype_that_contradicts_the_graph_is_unsupported(
    tmp_path: Path, iris_package: Path
) -> None:
    def int_input(raw: dict[str, Any]) -> None:
        raw["inputs"][0]["datatype"] = "INT64"

    folder, manifest = edited(iris_package, tmp_path, int_input)
    with pytest.raises(
        SchemaUnsupported, match=r"inputs\[0\].*manifest says INT64.*tensor\(float\)"
    ):
        load_model(folder, manifest)


def test_input_without_batch_dimension_is_unsupported(tmp_path: Path, iris_package: Path) -> None:
    def fixed(raw: dict[str, Any]) -> None:
        raw["inputs"][0]["shape"] = [4]

    folder, manifest = edited(iris_package, tmp_path, fixed)
    with pytest.raises(SchemaUnsupported, match="no batch dimension"):
        load_model(folder, manifest)


def test_unknown_output_is_unsupported(tmp_path: Path, iris_package: Path) -> None:
    def extra(raw: dict[str, Any]) -> None:
        raw["outputs"].append({"name": "scores", "datatype": "FP32", "shape": [-1]})

    folder, manifest = edited(iris_package, tmp_path, extra)
    with pytest.raises(SchemaUnsupported, match="'scores': not an output of the ONNX graph"):
        load_model(folder, manifest)


def test_a_file_that_is_not_onnx_fails_to_load_with_the_reason(
    tmp_path: Path, iris_package: Path
) -> None:
    garbage = b"this is not a protobuf" * 10

    def swap_artifact(raw: dict[str, Any]) -> None:
        raw["artifact"].update(size=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())

    folder, manifest = edited(iris_package, tmp_path, swap_artifact)
    (folder / "model.onnx").write_bytes(garbage)
    with pytest.raises(ModelLoadFailed) as info:
        load_model(folder, manifest)
    message = str(info.value)
    assert "iris 1.0.0: onnxruntime cannot load model.onnx" in message
    assert "\n" not in message


def test_wrong_input_shape_at_run_time_is_the_callers_mistake(iris_package: Path) -> None:
    manifest = read_manifest(iris_package)
    model = load_model(iris_package, manifest)
    with pytest.raises(BadRequest, match="inputs:"):
        model.run({manifest.inputs[0].name: np.zeros((1, 3), dtype=np.float32)})


def test_to_array_converts_json_values_per_datatype() -> None:
    assert to_array([[1, 2]], "FP32").dtype == np.float32
    assert to_array([[1, 2]], "INT64").dtype == np.int64
    strings = to_array([["Oslo"], [b"Bergen"], [3]], "BYTES")
    assert strings.dtype == object
    assert strings.tolist() == [["Oslo"], ["Bergen"], ["3"]]
