"""Result and feedback rows as a device sends them, stored through fleet.db, for tests."""

from __future__ import annotations

import json
from typing import Any

from agent.wire import payloads
from fleet.db import Batch, Database, StoreReport

T0 = 1_790_000_000.0


def result(
    seq: int,
    *,
    prediction: Any = (1,),
    model: str = "iris",
    version: str = "1.0.0",
    request_id: str | None = None,
    t: float | None = None,
) -> str:
    """One result object as the agent's forwarder writes it."""
    return payloads.result_json(
        seq,
        t=T0 + seq if t is None else t,
        model=model,
        version=version,
        inputs=json.dumps([[5.1, 3.5, 1.4, 0.2]]),
        outputs=json.dumps({"prediction": list(prediction), "probabilities": [[0.9, 0.1]]}),
        latency_ms=0.25,
        request_id=request_id,
    )


def feedback(
    seq: int, label: Any, *, request_id: str | None = None, result_seq: int | None = None
) -> str:
    body = payloads.feedback(label, request_id=request_id, result_seq=result_seq)
    return payloads.feedback_json(seq, t=T0 + seq, feedback=json.dumps(body))


def rows(device: str, *objects: str) -> list[dict[str, Any]]:
    """Decoded and checked as the collector does with a message."""
    raw = payloads.results_head(device) + ",".join(objects).encode() + payloads.RESULTS_TAIL
    checked: list[dict[str, Any]] = payloads.check_results(json.loads(raw), "test")["results"]
    return checked


def store(db: Database, device: str, *objects: str) -> StoreReport:
    batch = Batch()
    batch.add_results(device, rows(device, *objects))
    return db.store(batch)
