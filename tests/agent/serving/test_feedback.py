"""Request ids, ground truth (``POST /feedback``) and what of the inputs is recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.wire import payloads
from tests.agent.serving.stack import Served, serve
from tests.fixtures.rows import all_rows

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture
def served(tmp_path: Path, iris_package: Path) -> Any:
    with serve(tmp_path, iris_package, transport=False) as s:
        yield s


def batch_of(served: Served) -> dict[str, Any]:
    """The buffer's rows as the forwarder would send them, read back by the wire's check."""
    rows = all_rows(served.buffer)
    text = payloads.results_head("d1") + ",".join(r.to_json() for r in rows).encode()
    return payloads.check_results(json.loads(text + payloads.RESULTS_TAIL), "batch")


def test_request_id_from_the_body_or_header_is_answered_and_recorded(served: Served) -> None:
    client = served.client()
    r = client.predict({"features": [ROW], "request_id": "order-17"})
    assert (r.status, r.json["request_id"]) == (200, "order-17")
    r = client.request("POST", "/predict", {"features": [ROW]}, {"X-Request-Id": "hdr-1"})
    assert r.json["request_id"] == "hdr-1"
    r = client.predict({"features": [ROW]})
    assert "request_id" not in r.json
    r = client.request(
        "POST", "/v2/models/iris/infer",
        {"id": "oip-9", "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                    "data": ROW}]},
    )  # fmt: skip
    assert (r.status, r.json["id"]) == (200, "oip-9")
    rows = batch_of(served)["results"]
    assert [row.get("request_id") for row in rows] == ["order-17", "hdr-1", None, "oip-9"]
    assert rows[3]["outputs"]["prediction"] == rows[0]["outputs"]["prediction"]


@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        (7, "request_id: expected a string, got 7"),
        ("", "request_id: expected 1..128 characters, got 0"),
        ("x" * 129, "request_id: expected 1..128 characters, got 129"),
        ("a\nb", "request_id: 'a\\nb' has unprintable characters"),
    ],
)
def test_bad_request_ids_are_400_naming_the_field(
    served: Served, request_id: Any, message: str
) -> None:
    r = served.client().predict({"features": [ROW], "request_id": request_id})
    assert (r.status, r.error) == (400, message)
    assert all_rows(served.buffer) == []  # a refused request is not recorded


def test_feedback_travels_like_a_result(served: Served) -> None:
    client = served.client()
    client.predict({"features": [ROW], "request_id": "r1"})
    r = client.request("POST", "/feedback", {"request_id": "r1", "label": "setosa"})
    assert (r.status, r.json) == (200, {"recorded": True, "seq": 2})
    r = client.request("POST", "/feedback", {"seq": 1, "label": ["setosa"]})
    assert r.json["seq"] == 3
    rows = batch_of(served)["results"]
    assert rows[1] == {
        "seq": 2, "time": rows[1]["time"],
        "feedback": {"label": "setosa", "request_id": "r1"},
    }  # fmt: skip
    assert rows[2]["feedback"] == {"label": ["setosa"], "result_seq": 1}
    # The forwarder's SQL builds the same objects as BufferedRow.to_json.
    batch = served.buffer.take_batch_json(10)
    assert batch is not None

    def exact(row: dict[str, Any]) -> dict[str, Any]:  # SQLite prints 15 digits of a float
        return {k: v for k, v in row.items() if k not in ("time", "latency_ms")}

    assert [exact(r) for r in json.loads("[" + batch.json + "]")] == [exact(r) for r in rows]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ([1], 400, "body: expected a JSON object with 'label' and 'request_id' or 'seq'"),
        ({"request_id": "r1"}, 400, "label: missing (the true outcome)"),
        ({"label": 1}, 400, "expected request_id or seq (which result)"),
        ({"label": {"a": 1}, "seq": 1}, 400, "label: expected a string, number or boolean"),
        ({"label": 1, "seq": 0}, 400, "seq: expected a positive integer, got 0"),
        ({"label": 1, "seq": 1, "model": "x"}, 400, "model: unknown field"),
    ],
)
def test_bad_feedback_is_refused_naming_the_field(
    served: Served, body: Any, status: int, message: str
) -> None:
    r = served.client().request("POST", "/feedback", body)
    assert r.status == status and r.error.startswith(message), r.error
    assert all_rows(served.buffer) == []


@pytest.mark.parametrize("mode", ["all", "hash", "none"])
def test_record_inputs_controls_what_leaves_the_device(
    tmp_path: Path, iris_package: Path, mode: str
) -> None:
    def configure(cfg: Config) -> None:
        cfg.buffer.record_inputs = mode

    with serve(tmp_path, iris_package, transport=False, configure=configure) as s:
        r = s.client().predict({"features": [ROW]})
        assert r.status == 200
        [row] = batch_of(s)["results"]
    digest = hashlib.sha256(json.dumps([ROW], separators=(",", ":")).encode()).hexdigest()
    expected = {"all": [ROW], "hash": {"sha256": digest}, "none": None}[mode]
    assert row["inputs"] == expected
    assert row["outputs"]["prediction"] == r.json["prediction"]  # outputs always kept
