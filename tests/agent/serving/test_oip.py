"""The Open Inference Protocol routes over raw HTTP: metadata, health, infer, binary data."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.serving.oip import TRITON_DATATYPES
from agent.wire.datatypes import DATATYPES
from tests.agent.serving.stack import Client, Served, serve
from tests.fixtures.rows import all_rows


@pytest.fixture
def served(tmp_path: Path, iris_package: Path, columns_package: Path) -> Any:
    with serve(tmp_path, iris_package, columns_package) as s:
        yield s


@pytest.fixture
def client(served: Served) -> Client:
    return served.client()


def infer_body(data: Any, shape: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
        **extra,
    }


def bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def binary_request(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def test_server_metadata_and_health(client: Client) -> None:
    meta = client.request("GET", "/v2")
    assert meta.status == 200
    assert meta.json["name"] == "edge-agent"
    assert "binary_tensor_data" in meta.json["extensions"]
    live = client.request("GET", "/v2/health/live")
    assert (live.status, live.json) == (200, {"live": True})
    ready = client.request("GET", "/v2/health/ready")
    assert (ready.status, ready.json) == (200, {"ready": True})
    assert ready.headers["content-type"] == "application/json"


def test_ready_is_503_without_a_model(tmp_path: Path) -> None:
    with serve(tmp_path) as served:
        c = served.client()
        assert (
            c.request("GET", "/v2/health/ready").status,
            c.request("GET", "/v2/health/live").status,
        ) == (503, 200)
        assert c.request("GET", "/v2/health/ready").json == {"ready": False}
        assert c.request("GET", "/v2/health/live").json == {"live": True}
        assert c.request("GET", "/v2/models/iris").status == 404


def test_model_metadata_from_the_manifest(client: Client) -> None:
    for path in ("/v2/models/iris", "/v2/models/iris/versions/1.0.0"):
        meta = client.request("GET", path).json
        assert meta["name"] == "iris"
        assert meta["versions"] == ["1.0.0"]
        assert meta["platform"] == "onnx"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
            "label": "BYTES",
            "probabilities": "FP32",
        }
    columns = client.request("GET", "/v2/models/columns").json
    assert [(i["name"], i["datatype"], i["shape"]) for i in columns["inputs"]] == [
        ("age", "FP32", [-1, 1]),
        ("city", "BYTES", [-1, 1]),
    ]


def test_unknown_model_or_version_is_404(client: Client) -> None:
    assert client.request("GET", "/v2/models/nope").error == "model 'nope' is not installed"
    r = client.request("GET", "/v2/models/iris/versions/9.9.9")
    assert (r.status, r.error) == (404, "model 'iris' version '9.9.9' is not installed")
    assert client.request("GET", "/v2/models/iris/versions/9.9.9/ready").status == 404
    assert (
        client.request(
            "POST", "/v2/models/iris/versions/9.9.9/infer", infer_body([1, 2, 3, 4], [1, 4])
        ).status
        == 404
    )
    ready = client.request("GET", "/v2/models/iris/versions/1.0.0/ready")
    assert (ready.status, ready.json) == (200, {"ready": True})
    ready = client.request("GET", "/v2/models/iris/ready")
    assert (ready.status, ready.json) == (200, {"ready": True})
    unknown = client.request("GET", "/v2/models/nope/ready")
    assert (unknown.status, unknown.error) == (404, "model 'nope' is not installed")


def test_infer_json_flat_and_nested(client: Client, iris_data: Any, iris_estimator: Any) -> None:
    x = iris_data[0][[0, 60, 120]]
    flat = client.request(
        "POST", "/v2/models/iris/infer", infer_body(x.reshape(-1).tolist(), [3, 4], id="r-1")
    )
    nested = client.request(
        "POST", "/v2/models/iris/versions/1.0.0/infer", infer_body(x.tolist(), [3, 4])
    )
    assert flat.status == nested.status == 200
    assert flat.headers["content-type"] == "application/json"
    body = flat.json
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "1.0.0", "r-1")
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [3],
        "data": iris_estimator.predict(x).tolist(),
    }
    assert outputs["probabilities"]["shape"] == [3, 3]
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(3, 3),
        iris_estimator.predict_proba(x),
        atol=1e-5,
    )
    assert nested.json["outputs"] == body["outputs"]


def test_requested_outputs_only(client: Client) -> None:
    body = infer_body([5.1, 3.5, 1.4, 0.2], [1, 4], outputs=[{"name": "label"}])
    outputs = client.request("POST", "/v2/models/iris/infer", body).json["outputs"]
    assert [o["name"] for o in outputs] == ["label"]


def test_binary_inputs_and_outputs(client: Client, iris_data: Any, iris_estimator: Any) -> None:
    x = iris_data[0][:5].astype(np.float32)
    raw = x.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [5, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "probabilities", "parameters": {"binary_data": True}},
        ],
    }
    body, headers = binary_request(header, raw)
    r = client.request("POST", "/v2/models/iris/infer", body, headers)
    assert r.status == 200, r.body
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.body[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert all("data" not in o for o in head["outputs"])
    assert n + sum(sizes) == len(r.body)
    label_raw = r.body[n : n + sizes[0]]
    labels, pos = [], 0
    while pos < len(label_raw):
        (size,) = struct.unpack_from("<I", label_raw, pos)
        labels.append(label_raw[pos + 4 : pos + 4 + size].decode())
        pos += 4 + size
    assert labels == iris_estimator.predict(x).tolist()
    proba = np.frombuffer(r.body[n + sizes[0] :], dtype="<f4").reshape(5, 3)
    np.testing.assert_allclose(proba, iris_estimator.predict_proba(x), atol=1e-5)


def test_binary_bytes_input_and_request_level_binary_output(
    client: Client, columns_estimator: Any, columns_frame: Any
) -> None:
    frame = columns_frame[["age", "city"]].iloc[:4]
    age = frame["age"].to_numpy(np.float32).tobytes()
    city = bytes_tensor(frame["city"].tolist())
    header = {
        "inputs": [
            {
                "name": "age",
                "shape": [4, 1],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(age)},
            },
            {
                "name": "city",
                "shape": [4, 1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(city)},
            },
        ],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_request(header, age, city)
    r = client.request("POST", "/v2/models/columns/infer", body, headers)
    assert r.status == 200, r.body
    n = int(r.headers["inference-header-content-length"])
    label = next(o for o in json.loads(r.body[:n])["outputs"] if o["name"] == "label")
    assert label["datatype"] == "BYTES"
    expected = columns_estimator.predict(frame).tolist()
    assert bytes_tensor(expected) in r.body[n:]


BAD_INFER = [
    (
        infer_body([1, 2, 3, 4, 5, 6], [2, 3]),
        "inputs[0] (input): expected shape [-1, 4], got [2, 3]",
    ),
    (infer_body([1, 2, 3, 4], [4]), "inputs[0] (input): expected shape [-1, 4], got [4]"),
    (
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]},
        "inputs[0] (input): datatype 'FP64', expected 'FP32'",
    ),
    (infer_body([1, 2, 3], [1, 4]), "inputs[0] (input): data has 3 values, shape [1, 4] needs 4"),
    (infer_body([1, 2, "x", 4], [1, 4]), "inputs[0] (input).data[2]: expected a number, got 'x'"),
    (
        infer_body([1, 2, False, 4], [1, 4]),
        "inputs[0] (input).data[2]: expected a number, got False",
    ),
    (
        {"inputs": [{"name": "sepal", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        "inputs[0].name: 'sepal' is not an input of model 'iris' (inputs: input)",
    ),
    ({"inputs": []}, "inputs: expected a non-empty list of input tensors"),
    ({"id": "x"}, "inputs: expected a non-empty list of input tensors"),
    (
        infer_body([1, 2, 3, 4], [1, 4], outputs=[{"name": "scores"}]),
        "outputs[0].name: 'scores' is not an output of model 'iris' (outputs: label, probabilities)",
    ),
    (
        infer_body([1, 2, 3, 4], [1, 4], parameters={"binary_data_output": "yes"}),
        "parameters.binary_data_output: expected true or false, got 'yes'",
    ),
    (infer_body([1e39, 2, 3, 4], [1, 4]), "inputs[0] (input): element 0 is inf"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_INFER)
def test_bad_infer_requests_are_400_naming_the_tensor(
    client: Client, body: Any, expected: str
) -> None:
    r = client.request("POST", "/v2/models/iris/infer", body)
    assert r.status == 400, r.body
    assert r.error.startswith(expected), r.error


def test_missing_input_is_named(client: Client) -> None:
    body = {"inputs": [{"name": "age", "shape": [1, 1], "datatype": "FP32", "data": [30]}]}
    r = client.request("POST", "/v2/models/columns/infer", body)
    assert (r.status, r.error) == (400, "inputs: missing input 'city' of model 'columns'")


def test_bytes_json_input_must_be_strings(client: Client) -> None:
    body = {
        "inputs": [
            {"name": "age", "shape": [1, 1], "datatype": "FP32", "data": [30]},
            {"name": "city", "shape": [1, 1], "datatype": "BYTES", "data": [42]},
        ]
    }
    r = client.request("POST", "/v2/models/columns/infer", body)
    assert r.error == "inputs[1] (city).data[0]: expected a string, got 42"


def test_binary_size_mismatches_are_400(client: Client) -> None:
    raw = np.zeros((1, 4), dtype="<f4").tobytes()
    tensor = {
        "name": "input",
        "shape": [1, 4],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 12},
    }
    body, headers = binary_request({"inputs": [tensor]}, raw[:12])
    r = client.request("POST", "/v2/models/iris/infer", body, headers)
    assert (
        r.error == "inputs[0] (input): binary_data_size is 12 bytes, shape [1, 4] of FP32 needs 16"
    )

    tensor["parameters"] = {"binary_data_size": 16}
    body, headers = binary_request({"inputs": [tensor]}, raw + b"extra")
    r = client.request("POST", "/v2/models/iris/infer", body, headers)
    assert (
        r.error
        == "binary data: 21 bytes follow the inference header, the inputs' binary_data_size add up to 16"
    )

    body, headers = binary_request({"inputs": [tensor]}, raw[:8])
    r = client.request("POST", "/v2/models/iris/infer", body, headers)
    assert (
        r.error
        == "inputs[0] (input): binary_data_size 16 runs past the end of the body (8 bytes left)"
    )

    r = client.request(
        "POST", "/v2/models/iris/infer", body, {"Inference-Header-Content-Length": "9999"}
    )
    assert r.error.startswith("Inference-Header-Content-Length: 9999 is not within the body")

    nan = np.array([[1, np.nan, 3, 4]], dtype="<f4").tobytes()
    body, headers = binary_request({"inputs": [tensor]}, nan)
    r = client.request("POST", "/v2/models/iris/infer", body, headers)
    assert r.error.startswith(
        "inputs[0] (input): element 1 is nan, and model 'iris' does not accept"
    )


def test_empty_batches_answer_empty_outputs(client: Client) -> None:
    for tensor in (
        {"name": "input", "shape": [0, 4], "datatype": "FP32", "data": []},
        {
            "name": "input",
            "shape": [0, 4],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 0},
        },
    ):
        r = client.request("POST", "/v2/models/iris/infer", {"inputs": [tensor]})
        assert r.status == 200, r.body
        assert {o["name"]: o["shape"] for o in r.json["outputs"]} == {
            "label": [0],
            "probabilities": [0, 3],
        }


def test_bad_binary_bytes_tensor(client: Client) -> None:
    age = np.array([30], dtype="<f4").tobytes()
    city = struct.pack("<I", 50) + b"Oslo"
    header = {
        "inputs": [
            {
                "name": "age",
                "shape": [1, 1],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 4},
            },
            {
                "name": "city",
                "shape": [1, 1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(city)},
            },
        ]
    }
    body, headers = binary_request(header, age, city)
    r = client.request("POST", "/v2/models/columns/infer", body, headers)
    assert r.error == "inputs[1] (city): binary BYTES element 0 claims 50 bytes, 4 are left"


def test_infer_is_recorded_in_the_buffer(served: Served, client: Client) -> None:
    client.request("POST", "/v2/models/iris/infer", infer_body([[5.1, 3.5, 1.4, 0.2]], [1, 4]))
    [row] = all_rows(served.buffer)
    assert (row.model, row.version) == ("iris", "1.0.0")
    assert json.loads(row.inputs) == {"input": [[5.1, 3.5, 1.4, 0.2]]}
    outputs = json.loads(row.outputs)
    # The prediction output is recorded as "prediction", as /predict records it, so
    # the collector compares either protocol's results with ground truth the same way.
    assert outputs["prediction"] == ["setosa"] and "label" not in outputs
    assert len(outputs["probabilities"][0]) == 3


@pytest.mark.parametrize("binary_output", [False, True])
def test_empty_outputs_list_means_all_outputs(client: Client, binary_output: bool) -> None:
    params = {"parameters": {"binary_data_output": True}} if binary_output else {}
    answers = [
        client.request(
            "POST",
            "/v2/models/iris/infer",
            infer_body([5.1, 3.5, 1.4, 0.2], [1, 4], **extra, **params),
        )
        for extra in ({}, {"outputs": None}, {"outputs": []})
    ]
    assert [r.status for r in answers] == [200, 200, 200], answers[-1].body
    assert answers[2].headers["content-type"] == answers[0].headers["content-type"]
    assert answers[0].body == answers[1].body == answers[2].body
    if not binary_output:
        assert [o["name"] for o in answers[2].json["outputs"]] == ["label", "probabilities"]


@pytest.mark.parametrize("bad_id", [7, 1.5, True, {}, None, [], ["r-1"]])
def test_non_string_id_is_400_naming_the_field(client: Client, bad_id: Any) -> None:
    r = client.request(
        "POST", "/v2/models/iris/infer", infer_body([5.1, 3.5, 1.4, 0.2], [1, 4], id=bad_id)
    )
    assert r.status == 400, r.body
    assert r.error == f"id: expected a string, got {json.dumps(bad_id)}"


@pytest.mark.parametrize("good_id", ["r-7", "", "7"])
def test_string_id_is_echoed(client: Client, good_id: str) -> None:
    r = client.request(
        "POST", "/v2/models/iris/infer", infer_body([5.1, 3.5, 1.4, 0.2], [1, 4], id=good_id)
    )
    assert (r.status, r.json["id"]) == (200, good_id)


def test_model_config_is_triton_shaped(client: Client) -> None:
    expected = {
        "name": "iris",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": ["1.0.0"]}},
        "max_batch_size": 0,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
        "output": [
            {"name": "label", "data_type": "TYPE_STRING", "dims": [-1]},
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, 3]},
        ],
    }
    for path in ("/v2/models/iris/config", "/v2/models/iris/versions/1.0.0/config"):
        r = client.request("GET", path)
        assert (r.status, r.json) == (200, expected), path
    columns = client.request("GET", "/v2/models/columns/config").json
    assert [(i["name"], i["data_type"], i["dims"]) for i in columns["input"]] == [
        ("age", "TYPE_FP32", [-1, 1]),
        ("city", "TYPE_STRING", [-1, 1]),
    ]
    unknown = client.request("GET", "/v2/models/nope/config")
    assert (unknown.status, unknown.error) == (404, "model 'nope' is not installed")
    old = client.request("GET", "/v2/models/iris/versions/9.9.9/config")
    assert (old.status, old.error) == (404, "model 'iris' version '9.9.9' is not installed")
    wrong = client.request("POST", "/v2/models/iris/config", b"{}")
    assert (wrong.status, wrong.headers["allow"]) == (405, "GET")
    metrics = client.request("GET", "/metrics").body.decode()
    assert 'route="/v2/models/{model}/config"' in metrics
    assert 'route="/v2/models/{model}/versions/{version}/config"' in metrics


def test_triton_datatype_names_cover_every_datatype() -> None:
    assert set(TRITON_DATATYPES) == DATATYPES
    assert TRITON_DATATYPES["BYTES"] == "TYPE_STRING"
    assert {TRITON_DATATYPES[d] for d in ("BOOL", "UINT8", "INT32", "INT64", "FP16", "FP64")} == {
        "TYPE_BOOL",
        "TYPE_UINT8",
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_FP16",
        "TYPE_FP64",
    }


def test_tritonclient_get_model_config(served: Served) -> None:
    triton_client = triton.InferenceServerClient(f"{served.host}:{served.port}")
    try:
        config = triton_client.get_model_config("iris")
        assert config["name"] == "iris"
        assert config["max_batch_size"] == 0
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
            ("input", "TYPE_FP32", [-1, 4])
        ]
        assert [o["name"] for o in config["output"]] == ["label", "probabilities"]
        assert triton_client.get_model_config("iris", "1.0.0") == config
        with pytest.raises(InferenceServerException) as unknown:
            triton_client.get_model_config("nope")
        assert "model 'nope' is not installed" in str(unknown.value)
    finally:
        triton_client.close()


def test_trailing_slash_on_v2_get_routes(client: Client) -> None:
    for path, plain in [
        ("/v2/", "/v2"),
        ("/v2/health/live/", "/v2/health/live"),
        ("/v2/health/ready/", "/v2/health/ready"),
        ("/v2/models/iris/", "/v2/models/iris"),
        ("/v2/models/iris/versions/1.0.0/", "/v2/models/iris/versions/1.0.0"),
        ("/v2/models/iris/ready/", "/v2/models/iris/ready"),
        ("/v2/models/iris/config/", "/v2/models/iris/config"),
    ]:
        slashed, expected = client.request("GET", path), client.request("GET", plain)
        assert (slashed.status, slashed.body) == (expected.status, expected.body), path
        assert slashed.status == 200, path
    assert client.request("GET", "/v2/").json["name"] == "edge-agent"
    infer = client.request("POST", "/v2/models/iris/infer/", infer_body([1, 2, 3, 4], [1, 4]))
    assert infer.status == 200, infer.body  # any method: the slash is not part of the route
    assert client.request("GET", "/v2//").status == 404  # one slash, not any number
    assert client.request("GET", "/predict/").status == 404  # only under /v2
    metrics = client.request("GET", "/metrics").body.decode()
    assert 'route="/v2/"' not in metrics  # labels stay the templates
    assert 'route="/v2/models/{model}/"' not in metrics
