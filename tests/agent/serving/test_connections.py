"""A flood of idle or slow connections cannot take the agent off the air.

A real ``edge-agent run`` with 1,024 file descriptors (the common default), real sockets
from this process: 1,100 idle connections, 200 slowloris clients, idle keep-alives.
The agent answers new requests at once (200, or a fast 503 while the cap is full),
does not spin, closes what overstays, and serves as before once the flood is gone.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROW = {"features": [[5.1, 3.5, 1.4, 0.2]]}
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def nofile(soft: int) -> Iterator[None]:
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def agent_with_1024_descriptors(start_agent: Callable[..., Any], pkg: Path, **http: Any) -> Any:
    with nofile(1024):  # the agent inherits the limit of the moment it is started
        return start_agent({"http": http}, packages=[pkg])


def open_many(agent: Any, count: int, first: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection((agent.host, agent.port), timeout=5)
        if first:
            s.sendall(first)
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(65536) == b"" or closed_by_server(s)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def cpu_seconds(agent: Any) -> float:
    t = psutil.Process(agent.proc.pid).cpu_times()
    return float(t.user + t.system)


@pytest.mark.parametrize(
    ("http", "reason"),
    [({}, "limit"), ({"max_connections": 5000}, "descriptors")],
    ids=["over-the-cap", "out-of-descriptors"],
)
def test_1100_idle_connections_leave_the_agent_answering(
    start_agent: Callable[..., Any], iris_package: Path, http: dict[str, Any], reason: str
) -> None:
    agent = agent_with_1024_descriptors(start_agent, iris_package, **http)
    with nofile(8192):
        flood = open_many(agent, 1100)
        try:
            # A new request gets an answer, not a hang: a 503 naming why, or a 200.
            code, body = agent.request("POST", "/predict", ROW, timeout=5)
            assert code in (200, 503), body
            if code == 503:
                assert "try again" in body["error"]
            # Not spinning on a listening socket it cannot accept from.
            before = cpu_seconds(agent)
            time.sleep(2)  # a window to measure CPU over, not a wait for an outcome
            assert cpu_seconds(agent) - before < 1.0
        finally:
            for s in flood:
                s.close()
    agent.wait_for_request(lambda code, _: code == 200, "POST", "/predict", ROW, timeout=30)
    refused = [
        line for line in agent.metrics_text().splitlines()
        if line.startswith(f'edge_http_connections_refused_total{{reason="{reason}"}}')
    ]  # fmt: skip
    assert refused and float(refused[0].split()[-1]) > 0


def test_slowloris_clients_are_closed_at_the_header_deadline(
    start_agent: Callable[..., Any], iris_package: Path
) -> None:
    agent = agent_with_1024_descriptors(
        start_agent, iris_package, header_timeout_s=1.0, max_connections=300
    )
    with nofile(8192):
        slow = open_many(agent, 200, first=b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:
                open_ = [s for s in slow if not closed_by_server(s)]
                if not open_:
                    break
                for s in open_:  # one more header byte now and then keeps each alive
                    with contextlib.suppress(OSError):
                        s.send(b"X")
                time.sleep(0.2)
            assert all(closed_by_server(s) for s in slow)
        finally:
            for s in slow:
                s.close()
    assert agent.request("POST", "/predict", ROW)[0] == 200
    assert 'edge_http_connections_closed_total{reason="head"}' in agent.metrics_text()


def test_an_idle_keep_alive_connection_is_closed(
    start_agent: Callable[..., Any], iris_package: Path
) -> None:
    agent = start_agent({"http": {"idle_timeout_s": 0.5}}, packages=[iris_package])
    s = socket.create_connection((agent.host, agent.port), timeout=10)
    try:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        s.settimeout(10)
        assert s.recv(65536) == b""  # closed by the server after the idle deadline
    finally:
        s.close()
