"""Pieces of the end-to-end tests that run whole programs: a restartable program with
its log, prediction traffic that remembers what was answered, and polling."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Program:
    """A command run as its own process, restartable, its output appended to ``log``."""

    def __init__(self, command: Sequence[str], log: Path) -> None:
        self.command = list(command)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]


class Traffic:
    """Requests with request ids in a thread; remembers the ids that got an answer."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent  # tests.fixtures.agent.RunningAgent
        self.answered: list[str] = []
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._n = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._n += 1
            rid = f"r-{self._n}"
            body = {"features": [[5.1, 3.5, 1.4, 0.1 * (self._n % 20)]], "request_id": rid}
            try:
                code, answer = self.agent.request("POST", "/predict", body, timeout=2)
            except OSError:
                code, answer = 0, None  # the agent is down (killed): not answered
            if code == 200 and answer.get("request_id") == rid:
                self.answered.append(rid)
            else:
                self.refused += 1
                time.sleep(0.05)
            time.sleep(0.002)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` every 0.2 s; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
