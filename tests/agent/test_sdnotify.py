"""sd_notify over a real AF_UNIX datagram socket, the way systemd receives it."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import JournalFormatter, Notifier, WatchdogLoop, log_formatter, under_journald


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound datagram socket collecting messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self, wait_s: float = 0.0) -> list[str]:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return self.messages

    def wait_for(self, text: str, timeout_s: float = 5.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.drain(0.05)
            for m in self.messages:
                if text in m:
                    return m
        raise AssertionError(f"no notification containing {text!r}; got {self.messages}")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, dict[str, str]]]:
    # Short path: AF_UNIX addresses are limited to 108 bytes, pytest's tmp_path is long.
    path = f"/tmp/sdn-{uuid.uuid4().hex[:8]}.sock"
    receiver = FakeSystemd(path)
    yield receiver, {"NOTIFY_SOCKET": path}
    receiver.sock.close()
    os.unlink(path)


def test_ready_sends_ready_mainpid_and_status_in_one_datagram(systemd):
    receiver, env = systemd
    assert Notifier(env).ready("serving iris 1.0.0; no broker; backlog 0")
    (message,) = receiver.drain(0.2)
    assert message.split("\n") == [
        "READY=1",
        f"MAINPID={os.getpid()}",
        "STATUS=serving iris 1.0.0; no broker; backlog 0",
    ]


def test_status_is_one_line_even_when_the_text_is_not(systemd):
    receiver, env = systemd
    Notifier(env).status("serving iris 1.0.0;\nbroker connected")
    assert receiver.drain(0.2) == ["STATUS=serving iris 1.0.0; broker connected"]


def test_stopping_and_watchdog_messages(systemd):
    receiver, env = systemd
    n = Notifier(env)
    n.watchdog()
    n.stopping("stopping: flushing the result buffer")
    assert receiver.drain(0.2) == [
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping: flushing the result buffer",
    ]


def test_abstract_namespace_socket_named_with_at_sign():
    name = f"edge-sdnotify-test-{uuid.uuid4().hex}"
    receiver = FakeSystemd("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receiver.drain(0.2)[0].startswith("READY=1\n")
    finally:
        receiver.sock.close()


def test_without_systemd_every_call_is_a_silent_no_op():
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    loop = WatchdogLoop(n, lambda: True, interval_s=0.01)
    loop.start()
    assert not any(t.name == "sd-watchdog" for t in threading.enumerate())
    loop.stop()


def test_a_full_systemd_queue_drops_the_message_instead_of_blocking(systemd):
    receiver, env = systemd
    n = Notifier(env)
    sent = [n.watchdog() for _ in range(500)]  # nobody reads: the queue fills up
    assert sent[0] and not sent[-1]
    assert receiver.drain(0.2).count("WATCHDOG=1") == sum(sent)


def test_a_vanished_socket_is_logged_not_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="agent.sdnotify"):
        assert n.ready() is False
    assert "gone.sock" in caplog.text


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval_s == 15.0
    # Inherited by a child of the main process: not ours to ping.
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


def test_watchdog_pings_only_while_every_loop_is_alive(systemd):
    receiver, env = systemd
    alive = threading.Event()
    alive.set()
    loop = WatchdogLoop(
        Notifier({**env, "WATCHDOG_USEC": "100000"}), alive.is_set, status_interval_s=60
    )
    assert loop.watchdog_s == 0.05
    loop.start()
    try:
        assert any(t.name == "sd-watchdog" for t in threading.enumerate())
        receiver.drain(0.3)  # read as systemd does, so its queue never fills
        alive.clear()  # a component loop hangs
        receiver.drain(0.1)  # let the tick in flight finish
        pings_when_hung = loop.pings
        assert pings_when_hung >= 3
        receiver.drain(0.3)
        assert loop.pings == pings_when_hung, "pinged while a component was not alive"
        alive.set()
        receiver.drain(0.3)
        assert loop.pings > pings_when_hung, "pings did not resume after recovery"
    finally:
        loop.stop()
    assert receiver.drain(0.1).count("WATCHDOG=1") == loop.pings
    assert not any(t.name == "sd-watchdog" for t in threading.enumerate())


def test_a_failing_liveness_check_counts_as_not_alive(systemd, caplog):
    receiver, env = systemd

    def broken() -> bool:
        raise RuntimeError("forwarder state unreadable")

    loop = WatchdogLoop(Notifier({**env, "WATCHDOG_USEC": "100000"}), broken)
    with caplog.at_level(logging.ERROR, logger="agent.sdnotify"):
        loop.start()
        deadline = time.monotonic() + 10
        while loop.checks < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.stop()
    assert loop.checks >= 3  # it looked three times, and never pinged
    assert loop.pings == 0
    assert "WATCHDOG=1" not in receiver.drain(0.1)
    assert "forwarder state unreadable" in caplog.text


def test_status_line_is_refreshed_only_when_it_changes(systemd):
    receiver, env = systemd
    backlog = [0]
    loop = WatchdogLoop(
        Notifier(env),
        lambda: True,
        status=lambda: f"serving iris 1.0.0; broker connected; backlog {backlog[0]}",
        status_interval_s=0.05,
    )
    loop.start()
    try:
        receiver.wait_for("backlog 0")
        backlog[0] = 7
        receiver.wait_for("backlog 7")
    finally:
        loop.stop()
    statuses = [m for m in receiver.drain(0.1) if m.startswith("STATUS=")]
    assert statuses == [
        "STATUS=serving iris 1.0.0; broker connected; backlog 0",
        "STATUS=serving iris 1.0.0; broker connected; backlog 7",
    ]
    # No watchdog asked for: status only, no pings.
    assert loop.pings == 0


def test_journal_lines_carry_the_priority_and_no_timestamp():
    f = JournalFormatter()
    record = logging.LogRecord(
        "agent.http", logging.WARNING, __file__, 1, "slow: %d ms", (12,), None
    )
    assert f.format(record) == "<4>agent.http: slow: 12 ms"
    try:
        raise ValueError("bad row")
    except ValueError:
        record = logging.LogRecord(
            "agent.buffer", logging.ERROR, __file__, 1, "flush failed", (), sys.exc_info()
        )
    lines = f.format(record).splitlines()
    assert lines[0] == "<3>agent.buffer: flush failed"
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)


def test_journald_is_recognised_by_the_stream_identity(tmp_path):
    with open(tmp_path / "log", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(stream, env)
        assert not under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not under_journald(stream, {})
    # Outside journald, lines keep a UTC timestamp for whoever reads the terminal.
    assert "%(asctime)s" in (log_formatter(sys.__stderr__)._fmt or "")


@pytest.mark.slow
def test_a_real_agent_pings_reports_backlog_and_logs_for_journald(
    start_agent, systemd, iris_package, tmp_path
):
    """`edge-agent run` as systemd runs it: notify socket, 1 s watchdog, journal stream."""
    receiver, env = systemd
    agent = start_agent({"models": {"allow_unsigned": True}}, packages=[iris_package], start=False)
    agent.log_path.touch()
    st = agent.log_path.stat()
    agent.env.update(env, WATCHDOG_USEC="1000000", JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    agent.start(wait=False)

    ready = receiver.wait_for("READY=1", timeout_s=30)
    assert "STATUS=serving iris 1.0.0; no broker; backlog 0" in ready
    receiver.wait_for("WATCHDOG=1", timeout_s=5)
    code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
    assert code == 200, body
    # Without a broker the result stays buffered, and `systemctl status` says so.
    receiver.wait_for("STATUS=serving iris 1.0.0; no broker; backlog 1", timeout_s=5)

    agent.proc.send_signal(signal.SIGTERM)
    stopping = receiver.wait_for("STOPPING=1", timeout_s=10)
    assert agent.proc.wait(timeout=20) == 0
    after = receiver.drain(0.2)
    assert "WATCHDOG=1" not in after[after.index(stopping) + 1 :], "pinged after STOPPING=1"
    assert receiver.messages.count("WATCHDOG=1") >= 2

    lines = agent.logs().splitlines()
    assert lines, "the agent wrote no log"
    # journald style: a priority prefix, no timestamp (the journal adds its own).
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>agent.supervisor: ") for line in lines), lines
    # The clean shutdown kept the buffered result.
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM"):
        del agent.env[key]
    agent.start()
    assert agent.status()["buffer"]["rows"] == 1
