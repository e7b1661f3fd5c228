"""The HTTP transport on loopback: keep-alive, token, limits, encodings, bad requests."""

from __future__ import annotations

import gzip
import json
import socket
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest

from agent.config import BufferConfig
from agent.results.buffer import ResultBuffer
from agent.serving.codecs import choose_encoding
from tests.agent.serving.stack import Client, Served, serve
from tests.fixtures.rows import all_rows

ROW = {"features": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.fixture
def served(tmp_path: Path, iris_package: Path) -> Any:
    with serve(tmp_path, iris_package, max_body_bytes=64 * 1024) as s:
        yield s


def raw_exchange(served: Served, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or a full answer arrived."""
    with socket.create_connection((served.host, served.port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            text = b"".join(chunks)
            head, sep, body = text.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
        return b"".join(chunks)


def assert_still_serving(served: Served) -> None:
    r = served.client().predict(ROW)
    assert r.status == 200, r.body


def test_keep_alive_answers_are_not_delayed(served: Served) -> None:
    c = served.client()
    for _ in range(5):
        assert c.predict(ROW).status == 200
    # Without TCP_NODELAY each keep-alive answer waits ~40 ms for a delayed ACK (the
    # figure itself is bench/http.py's): the server side of this connection has it set.
    assert served.http is not None and served.http._server is not None
    [conn] = served.http._server.conns.sockets()
    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_every_error_is_json_and_the_server_keeps_serving(served: Served) -> None:
    c = served.client()
    cases = [
        ("POST", "/predict", b'{"features": [[1, 2', {}, 400),
        ("POST", "/predict", b"\xff\xfe", {}, 400),
        ("GET", "/nowhere", None, {}, 404),
        ("GET", "/predict", None, {}, 405),
        ("PUT", "/v2/models/iris/infer", b"{}", {}, 405),
        ("POST", "/v2/health/live", b"", {}, 405),
        ("BREW", "/predict", None, {}, 405),
        ("POST", "/predict", b"{}", {"Content-Encoding": "br"}, 415),
        ("POST", "/predict", b"not gzip", {"Content-Encoding": "gzip"}, 400),
        ("POST", "/v2/models/iris/infer", b"{}", {"Inference-Header-Content-Length": "x"}, 400),
    ]
    for method, path, body, headers, status in cases:
        r = c.request(method, path, body, headers)
        assert r.status == status, (method, path, r.body)
        assert r.headers["content-type"] == "application/json"
        assert r.error, r.body
    assert c.request("GET", "/predict").headers["allow"] == "POST"
    brotli = c.request("POST", "/predict", b"{}", {"Content-Encoding": "br"})
    assert (
        brotli.error
        == "Content-Encoding: 'br' is not supported (expected gzip, deflate or identity)"
    )
    assert c.predict(ROW).status == 200  # same connection, still serving


def test_malformed_http_is_a_json_400(served: Served) -> None:
    answer = raw_exchange(served, b"THIS IS NOT HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("request: ")
    assert_still_serving(served)


def test_body_over_the_limit_is_413_before_it_is_sent(served: Served) -> None:
    # Only the headers go out: the server must answer without waiting for 10 MB.
    answer = raw_exchange(
        served,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
        read_timeout=3,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == "body: 10000000 bytes is over the limit of 65536 bytes"
    assert b"Connection: close" in answer
    assert_still_serving(served)


def test_client_that_sends_an_oversize_body_first_still_reads_the_413(served: Served) -> None:
    # urllib sends the whole body without Expect: 100-continue and only then reads: the
    # server must drain it (bounded) instead of resetting the connection under it.
    request = urllib.request.Request(
        f"{served.url}/predict", data=b"x" * (12 * 1024 * 1024), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 413
    body = json.loads(caught.value.read())
    assert body["error"] == "body: 12582912 bytes is over the limit of 65536 bytes"
    assert_still_serving(served)


def test_gzip_bomb_is_413_without_inflating_it(served: Served) -> None:
    bomb = gzip.compress(b"0" * (50 * 1024 * 1024))  # 50 MiB of zeros in ~50 KiB
    assert len(bomb) < 64 * 1024
    r = served.client().request("POST", "/predict", bomb, {"Content-Encoding": "gzip"})
    assert r.status == 413
    assert r.error == "body: 65537 bytes is over the limit of 65536 bytes"
    assert_still_serving(served)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-15)),  # raw deflate, as some clients send
    ],
)
def test_compressed_request_bodies(served: Served, encoding: str, compress: Any) -> None:
    r = served.client().request(
        "POST", "/predict", compress(json.dumps(ROW).encode()), {"Content-Encoding": encoding}
    )
    assert r.status == 200, r.body
    assert r.json["prediction"] == ["setosa"]


def test_chunked_request_body(served: Served) -> None:
    body = json.dumps(ROW).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = raw_exchange(
        served,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["prediction"] == ["setosa"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_only_large_infer_answers_are_compressed(served: Served, encoding: str) -> None:
    c = served.client()
    rows = [[5.1, 3.5, 1.4, 0.2]] * 200
    infer = {"inputs": [{"name": "input", "shape": [200, 4], "datatype": "FP32", "data": rows}]}
    big = c.request("POST", "/v2/models/iris/infer", infer, {"Accept-Encoding": encoding})
    assert big.headers.get("content-encoding") == encoding
    plain = gzip.decompress(big.body) if encoding == "gzip" else zlib.decompress(big.body)
    assert json.loads(plain)["outputs"][0]["shape"] == [200]
    small = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": rows[0]}]}
    assert (
        "content-encoding"
        not in c.request(
            "POST", "/v2/models/iris/infer", small, {"Accept-Encoding": encoding}
        ).headers
    )
    predict = c.request("POST", "/predict", {"features": rows}, {"Accept-Encoding": encoding})
    assert "content-encoding" not in predict.headers  # only infer answers are compressed
    assert (
        "content-encoding"
        not in c.request("GET", "/metrics", None, {"Accept-Encoding": encoding}).headers
    )


def test_accept_encoding_parsing() -> None:
    assert choose_encoding("gzip, deflate, br") == "gzip"
    assert choose_encoding("deflate") == "deflate"
    assert choose_encoding("gzip;q=0, deflate;q=0.5") == "deflate"
    assert choose_encoding("br") is None
    assert choose_encoding("identity") is None
    assert choose_encoding("*") == "gzip"
    assert choose_encoding(None) is None


def test_bearer_token(tmp_path: Path, iris_package: Path) -> None:
    with serve(tmp_path, iris_package, token="s3cret-token") as served:
        anonymous = served.client()
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert anonymous.request("GET", path).status == 200, path  # probes stay open
        for method, path, body in [
            ("POST", "/predict", ROW),
            ("GET", "/metrics", None),
            ("GET", "/status", None),
            ("GET", "/v2", None),
            ("GET", "/v2/models/iris", None),
        ]:
            r = anonymous.request(method, path, body)
            assert r.status == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.error.startswith("Authorization: missing bearer token")
        wrong = served.client(token="s3cret-tokem").predict(ROW)
        assert (wrong.status, wrong.error) == (401, "Authorization: the bearer token is wrong")
        good = served.client(token="s3cret-token")
        assert good.predict(ROW).status == 200
        assert good.request("GET", "/status").status == 200


def test_unexpected_failure_is_a_counted_500_and_serving_goes_on(
    tmp_path: Path, iris_package: Path
) -> None:
    def broken_status() -> dict[str, Any]:
        raise RuntimeError("status source is broken")

    with serve(tmp_path, iris_package, status=broken_status) as served:
        c = served.client()
        r = c.request("GET", "/status")
        assert r.status == 500
        assert r.error == "internal error (RuntimeError); this is a bug, see the agent's log"
        metrics = c.request("GET", "/metrics").body.decode()
        assert (
            'edge_http_errors_total{model="",route="/status",status="500",version=""} 1.0'
            in metrics
        )
        assert c.predict(ROW).status == 200


def test_head_answers_headers_only(served: Served) -> None:
    answer = raw_exchange(served, b"HEAD /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b""


def test_real_agent_serves_every_route(start_agent: Any, iris_package: Path) -> None:
    agent = start_agent(packages=[iris_package])
    client = Client(agent.host, agent.port)
    assert client.predict(ROW).json["prediction"] == ["setosa"]
    assert client.request("GET", "/v2/health/ready").status == 200
    assert client.request("GET", "/v2/models/iris").json["versions"] == ["1.0.0"]
    infer = {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW["features"]}]
    }
    assert client.request("POST", "/v2/models/iris/infer", infer).status == 200
    status = client.request("GET", "/status").json
    assert status["models"]["iris"]["version"] == "1.0.0"
    assert status["buffer"]["rows"] == 2
    assert "edge_http_requests_total" in client.request("GET", "/metrics").body.decode()


def test_expect_100_continue_over_the_limit_is_413_without_continue(served: Served) -> None:
    answer = raw_exchange(
        served,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n",
        read_timeout=3,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert_still_serving(served)


def test_stop_ends_idle_keep_alive_connections(tmp_path: Path, iris_package: Path) -> None:
    with serve(tmp_path, iris_package) as served:
        sock = socket.create_connection((served.host, served.port), timeout=5)
        body = json.dumps(ROW).encode()
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        start = time.monotonic()
        served.http.stop()
        assert time.monotonic() - start < 3
        assert not served.http.alive()
        assert sock.recv(65536) == b""  # the server closed the idle connection
        sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v2 HTTP/2.0\r\n\r\n", b"400"),
        (b"GET /v2\r\n\r\n", b"400"),
        (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (
            b"GET /v2 HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n",
            b"431",
        ),
        (b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    ],
)
def test_malformed_request_lines_and_headers_are_4xx(
    served: Served, request_bytes: bytes, status: bytes
) -> None:
    answer = raw_exchange(served, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:100]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("request: ")
    assert_still_serving(served)


def test_connection_close_and_http_1_0_end_the_connection(served: Served) -> None:
    for request in (
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /v2 HTTP/1.0\r\n\r\n",
    ):
        with socket.create_connection((served.host, served.port), timeout=5) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):  # ends only when the server closes
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")
        assert json.loads(data.partition(b"\r\n\r\n")[2])["name"] == "edge-agent"


def test_header_names_are_case_insensitive(served: Served) -> None:
    body = gzip.compress(json.dumps(ROW).encode())
    request = (
        b"POST /predict HTTP/1.1\r\ncontent-LENGTH: %d\r\nCONTENT-encoding: gzip\r\nConnection: close\r\n\r\n"
        % len(body)
    )
    answer = raw_exchange(served, request + body)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_answered_predictions_survive_kill_9(start_agent: Any, iris_package: Path) -> None:
    agent = start_agent(packages=[iris_package])
    client = Client(agent.host, agent.port)
    sent = [[5.0 + i / 100, 3.5, 1.4, 0.2] for i in range(50)]
    for row in sent:
        assert client.predict({"features": [row]}).status == 200
    agent.kill()  # SIGKILL right after the last answer: no flush, no clean-up
    buffer = ResultBuffer(agent.state_dir / "buffer.db", BufferConfig())
    try:
        stored = [json.loads(r.inputs)[0] for r in all_rows(buffer)]
    finally:
        buffer.close()
    assert stored == sent


def test_port_in_use_is_a_one_line_error(served: Served) -> None:
    from agent.serving.server import HttpServer
    from agent.wire.errors import EdgeError

    cfg = served.cfg.http.__class__(host=served.host, port=served.port)
    with pytest.raises(EdgeError) as taken:
        HttpServer(cfg, served.service).start()
    assert str(taken.value) == (
        f"http.host/http.port: cannot listen on {served.host}:{served.port} (Address already in use)"
    )


def test_client_leaving_mid_answer_is_not_an_error(
    served: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2]] * 5000
    body = json.dumps({"features": rows}).encode()
    for _ in range(5):
        s = socket.create_connection((served.host, served.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        s.close()  # reset: the answer has nowhere to go
    assert_still_serving(served)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert "Traceback" not in capfd.readouterr().err


HUGE = "9" * 5000  # past Python's 4300-digit limit for int()

HUGE_CASES = [
    ("/predict", '{"features": [[5.1, 3.5, 1.4, %s]]}',
     "features[0][3]: expected a number, got an integer of 5000 digits"),
    ("/predict", '{"features": [[5.1, 3.5, 1.4, 0.2]], "extra": %s}', "extra: unknown field"),
    ("/predict", '{"features": [[5.1, 3.5, 1.4, 0.2]], "probabilities": -%s}',
     "probabilities: expected true or false"),
    ("/v2/models/iris/infer",
     '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, %s]}]}',
     "inputs[0] (input).data[3]: expected a number, got an integer of 5000 digits"),
    ("/v2/models/iris/infer",
     '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, %s], "data": [1, 2, 3, 4]}]}',
     "inputs[0] (input): expected shape [-1, 4]"),
    ("/v2/models/iris/infer",
     '{"id": %s, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}',
     "id: expected a string"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "template", "message"), HUGE_CASES)
def test_an_integer_too_long_to_convert_is_a_400_naming_the_field(
    served: Served, path: str, template: str, message: str
) -> None:
    r = served.client().request("POST", path, (template % HUGE).encode())
    assert r.status == 400, r.body[:300]
    assert r.error.startswith(message), r.error
    assert_still_serving(served)
