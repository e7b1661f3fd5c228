"""Off-the-shelf ``tritonclient.http`` against the agent, unchanged: the compatibility proof."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.agent.serving.stack import Served, serve


@pytest.fixture
def served(tmp_path: Path, iris_package: Path, columns_package: Path, rf_package: Path) -> Any:
    with serve(tmp_path, iris_package, columns_package, rf_package) as s:
        yield s


@pytest.fixture
def client(served: Served) -> Any:
    c = triton.InferenceServerClient(f"{served.host}:{served.port}")
    yield c
    c.close()


def fp32_input(x: np.ndarray, binary: bool = True) -> Any:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32), binary_data=binary)
    return tensor


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1.0.0")
    assert not client.is_model_ready("iris", "2.0.0")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "edge-agent"
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("columns")
    assert meta["platform"] == "onnx"
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        ("age", "FP32"),
        ("city", "BYTES"),
    ]


def test_binary_infer_with_string_labels(client: Any, iris_data: Any, iris_estimator: Any) -> None:
    x = iris_data[0][::30]
    result = client.infer("iris", [fp32_input(x)])  # no outputs named: all come back binary
    labels = result.as_numpy("label")
    assert [v.decode() for v in labels] == iris_estimator.predict(x).tolist()
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), iris_estimator.predict_proba(x), atol=1e-5
    )
    response = result.get_response()
    assert (response["model_name"], response["model_version"]) == ("iris", "1.0.0")


def test_json_infer_with_requested_output(client: Any, iris_data: Any, iris_estimator: Any) -> None:
    x = iris_data[0][:3]
    outputs = [triton.InferRequestedOutput("label", binary_data=False)]
    result = client.infer(
        "iris", [fp32_input(x, binary=False)], outputs=outputs, model_version="1.0.0"
    )
    assert result.as_numpy("label").tolist() == iris_estimator.predict(x).tolist()
    assert result.as_numpy("probabilities") is None  # not asked for


def test_int64_labels(client: Any, rf_data: Any, rf_estimator: Any) -> None:
    x = rf_data[0][:8]
    result = client.infer("rf", [fp32_input(x)])
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64
    assert labels.tolist() == rf_estimator.predict(x).tolist()
    json_result = client.infer(
        "rf",
        [fp32_input(x, False)],
        outputs=[triton.InferRequestedOutput("label", binary_data=False)],
    )
    assert json_result.as_numpy("label").tolist() == labels.tolist()


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input_tensor(
    client: Any, columns_frame: Any, columns_estimator: Any, binary: bool
) -> None:
    frame = columns_frame[["age", "city"]].iloc[:5]
    age = triton.InferInput("age", [5, 1], "FP32")
    age.set_data_from_numpy(frame["age"].to_numpy(np.float32).reshape(-1, 1), binary_data=binary)
    city = triton.InferInput("city", [5, 1], "BYTES")
    city.set_data_from_numpy(frame["city"].to_numpy(object).reshape(-1, 1), binary_data=binary)
    outputs = [triton.InferRequestedOutput("label", binary_data=binary)]
    result = client.infer("columns", [age, city], outputs=outputs)
    got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert got == columns_estimator.predict(frame).tolist()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(
    client: Any, iris_data: Any, iris_estimator: Any, algorithm: str
) -> None:
    x = np.repeat(iris_data[0][:3], 100, axis=0)  # large enough for the answer to be compressed
    result = client.infer(
        "iris",
        [fp32_input(x)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert [v.decode() for v in result.as_numpy("label")] == iris_estimator.predict(x).tolist()


def test_errors_reach_the_client_with_the_field(client: Any) -> None:
    with pytest.raises(InferenceServerException) as bad_shape:
        client.infer("iris", [fp32_input(np.zeros((2, 3)))])
    assert "inputs[0] (input): expected shape [-1, 4], got [2, 3]" in str(bad_shape.value)
    assert bad_shape.value.status() == "400"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [fp32_input(np.zeros((1, 4)))])
    assert "model 'nope' is not installed" in str(unknown.value)
    # The client (and server) keep working after the errors.
    assert client.infer("iris", [fp32_input(np.zeros((1, 4)))]).as_numpy("label").shape == (1,)
