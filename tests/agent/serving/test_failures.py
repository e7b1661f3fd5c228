"""Whose fault a failed request is: the caller's (a refused request, 4xx) or the model's.

Health ``errors`` and probation count only the model's own failures (onnxruntime
failing, a NaN or infinite output); a caller's bad rows or wrong shape are
``bad_requests``, so a bad client can never roll a good model back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from agent.disk import sha256_file
from agent.metrics import WindowStats
from agent.wire.package import read_manifest
from tests.agent.serving.stack import serve

ROW = [5.1, 3.5, 1.4, 0.2]


def test_wrong_shape_requests_are_bad_requests_not_model_errors(
    tmp_path: Path, iris_package: Path
) -> None:
    with serve(tmp_path, iris_package, transport=False) as s:
        window = s.metrics.inference.subscribe()
        client = s.client()
        assert client.predict({"features": [ROW[:3]]}).status == 400  # 3 of 4 features
        assert client.predict({"features": [["a", 1, 2, 3]]}).status == 400
        r = client.request(
            "POST", "/v2/models/iris/infer",
            {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32",
                         "data": [1.0, 2.0, 3.0]}]},
        )  # fmt: skip
        assert r.status == 400, r.body
        assert client.predict({"features": [ROW]}).status == 200
        taken = window.take()[("iris", "1.0.0")]
    assert taken == WindowStats(1, 0, taken.p50_ms, taken.p99_ms, bad_requests=3)


def nan_below(package: Path, out: Path, threshold: float = -50.0) -> Path:
    """The regressor with a graph that answers NaN when feature 0 is below ``threshold``.

    The output gets ``+ 0 * sqrt(x0 - threshold)``: zero for the parity rows (x0 near
    0), NaN for a row with x0 below the threshold. The request is valid; the model fails.
    """
    shutil.copytree(package, out)
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    x, y = graph.input[0].name, graph.output[0].name
    raw = f"{y}_raw"
    for node in graph.node:
        node.output[:] = [raw if o == y else o for o in node.output]
    graph.initializer.extend([
        helper.make_tensor("n_starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("n_ends", TensorProto.INT64, [1], [1]),
        helper.make_tensor("n_axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("n_shift", TensorProto.FLOAT, [], [-threshold]),
        helper.make_tensor("n_zero", TensorProto.FLOAT, [], [0.0]),
    ])  # fmt: skip
    graph.node.extend([
        helper.make_node("Slice", [x, "n_starts", "n_ends", "n_axes"], ["n_x0"]),
        helper.make_node("Add", ["n_x0", "n_shift"], ["n_shifted"]),
        helper.make_node("Sqrt", ["n_shifted"], ["n_root"]),
        helper.make_node("Mul", ["n_root", "n_zero"], ["n_nothing"]),
        helper.make_node("Add", [raw, "n_nothing"], [y]),
    ])  # fmt: skip
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    manifest = read_manifest(out).to_dict()
    manifest.pop("signature", None)
    manifest["artifact"] = {**manifest["artifact"], "size": (out / "model.onnx").stat().st_size,
                            "sha256": sha256_file(out / "model.onnx")}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_nan_output_is_the_models_failure(tmp_path: Path, regressor_package: Path) -> None:
    package = nan_below(regressor_package, tmp_path / "nan")
    with serve(tmp_path, package, transport=False) as s:
        window = s.metrics.inference.subscribe()
        client = s.client()
        ok = client.predict({"features": [[0.5, 0.1, -0.2, 0.3, 0.0]]})
        assert ok.status == 200 and isinstance(ok.json["prediction"][0], float)
        r = client.predict({"features": [[0.5, 0.1, -0.2, 0.3, 0.0], [-80.0, 0, 0, 0, 0]]})
        assert r.status == 500
        assert "output 'variable'[1, 0] is nan, not a finite number" in r.error
        assert "the model failed, not the request" in r.error
        taken = window.take()[("ridge", "1.0.0")]
        assert (taken.count, taken.errors, taken.bad_requests) == (2, 1, 0)
        assert s.buffer.stats().rows == 1  # only the answered request is buffered
