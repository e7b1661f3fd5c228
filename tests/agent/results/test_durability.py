"""Every answered prediction survives a kill -9 of the agent, under concurrency."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import BufferConfig
from agent.results.buffer import ResultBuffer
from tests.fixtures.rows import all_rows


def test_kill_9_after_answered_predictions_loses_none_of_them(
    start_agent: Callable[..., Any], iris_package: Path
) -> None:
    agent = start_agent(packages=[iris_package])
    answered: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set():
            # A value unique to this request, to find it in the buffer afterwards.
            marker = round(worker * 100_000 + i + 0.5, 1)
            try:
                code, _ = agent.request(
                    "POST", "/predict", {"features": [[marker, 3.5, 1.4, 0.2]]}, timeout=5
                )
            except OSError:
                return  # the agent was killed mid-request: that one was never answered
            if code == 200:
                with lock:
                    answered.append(marker)
            i += 1

    workers = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for w in workers:
        w.start()
    while True:
        with lock:
            if len(answered) >= 300:
                break
        threading.Event().wait(0.01)
    agent.kill()  # SIGKILL while requests are still in flight
    stop.set()
    for w in workers:
        w.join(10)

    buffer = ResultBuffer(agent.state_dir / "buffer.db", BufferConfig())
    recorded = {json.loads(row.inputs)[0][0] for row in all_rows(buffer)}
    buffer.close()
    lost = [m for m in answered if m not in recorded]
    assert len(answered) >= 300
    assert not lost, f"{len(lost)} answered predictions missing from the buffer: {lost[:5]}"

    # And the agent comes back on the same state, serving and still buffering.
    agent.start()
    code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
    assert code == 200 and body["prediction"] == ["setosa"]
