"""Minimal reference servers: onnxruntime and nothing else (no validation, no buffer).

    python bench/bare_ort.py stdlib MODEL.onnx PORT
    python bench/bare_ort.py starlette MODEL.onnx PORT

``stdlib``: http.server's ThreadingHTTPServer, HTTP/1.1 keep-alive, TCP_NODELAY.
``starlette``: starlette on uvicorn (its defaults: httptools/uvloop when installed).
The ceiling edge-agent is measured against.
"""

from __future__ import annotations

import os
import sys

# This folder holds bench/http.py: keep it off the import path so that it never
# shadows the standard library's http package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[2], options, providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
LABEL = session.get_outputs()[0].name


def predict(body: bytes) -> bytes:
    features = np.array(json.loads(body)["features"], dtype=np.float32)
    (label,) = session.run([LABEL], {INPUT: features})
    return json.dumps({"prediction": label.tolist()}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        out = predict(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def endpoint(request: Request) -> Response:
        return Response(predict(await request.body()), media_type="application/json")

    app = Starlette(routes=[Route("/predict", endpoint, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


if __name__ == "__main__":
    port = int(sys.argv[3])
    if sys.argv[1] == "starlette":
        run_starlette(port)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        server.serve_forever()
