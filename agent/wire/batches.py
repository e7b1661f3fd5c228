"""Result batches, feedback rows and the collector's acks: built and checked here.

The collector answers a batch on ``.../results/ack``. ``agent.wire.payloads`` names
every function and constant of this module too, so callers keep ``payloads.<name>``
for every payload.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from agent.wire.checks import InvalidPayload, object_of, positive_int, time_field
from agent.wire.times import rfc3339

# --- results -------------------------------------------------------------------------
#
# A batch on edge/devices/{device}/results is {"device": ..., "results": [row, ...]}. A
# row is a result or, when it has a "feedback" key, the ground truth a caller posted
# later for an earlier result (POST /feedback). Both kinds share the device's one
# increasing seq, travel in the same batches and are acknowledged the same way.

RESULT_KEYS = ("seq", "time", "model", "version", "inputs", "outputs", "latency_ms")
FEEDBACK_KEYS = ("seq", "time", "feedback")
# A caller's request id: printable, short enough to index.
MAX_REQUEST_ID = 128


def results_head(device: str) -> bytes:
    """The start of a results batch; the forwarder appends joined row objects and
    ``RESULTS_TAIL`` without re-parsing rows that are JSON already."""
    return f'{{"device":{json.dumps(device)},"results":['.encode()


RESULTS_TAIL = b"]}"


def result_json(
    seq: int,
    *,
    t: float,
    model: str,
    version: str,
    inputs: str,
    outputs: str,
    latency_ms: float,
    request_id: str | None = None,
) -> str:
    """One result object of a batch; ``inputs``/``outputs`` are JSON text already."""
    rid = "" if request_id is None else f',"request_id":{json.dumps(request_id)}'
    return (
        f'{{"seq":{seq},"time":{t!r},"model":{json.dumps(model)},'
        f'"version":{json.dumps(version)},"inputs":{inputs},'
        f'"outputs":{outputs},"latency_ms":{latency_ms!r}{rid}}}'
    )


def feedback_json(seq: int, *, t: float, feedback: str) -> str:
    """One feedback row of a batch; ``feedback`` is the JSON text of ``feedback()``."""
    return f'{{"seq":{seq},"time":{t!r},"feedback":{feedback}}}'


def request_id_problem(value: Any) -> str | None:
    """Why ``value`` is not a request id, or None when it is one."""
    if not isinstance(value, str):
        return f"expected a string, got {value!r:.60}"
    if not 1 <= len(value) <= MAX_REQUEST_ID:
        return f"expected 1..{MAX_REQUEST_ID} characters, got {len(value)}"
    if not value.isprintable():
        return f"{value!r:.60} has unprintable characters"
    return None


def _label_ok(value: Any) -> bool:
    scalar = (str, int, float, bool)
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, scalar) for v in value)
    return isinstance(value, scalar) and not (isinstance(value, float) and math.isnan(value))


def feedback(
    label: Any, *, request_id: str | None = None, result_seq: int | None = None
) -> dict[str, Any]:
    """Ground truth for one earlier result, named by the caller's request id or its seq.

    ``label`` is the true outcome: one value (a class label or a number), or a list with
    one value per row of the request.
    """
    body: dict[str, Any] = {"label": label}
    if request_id is not None:
        body["request_id"] = request_id
    if result_seq is not None:
        body["result_seq"] = result_seq
    return check_feedback(body, "feedback")


def check_feedback(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    if "label" not in obj:
        raise InvalidPayload(f"{where}: label: missing (the true outcome)")
    if not _label_ok(obj["label"]):
        raise InvalidPayload(
            f"{where}: label: expected a string, number or boolean, or a non-empty list"
            f" of them, got {obj['label']!r:.60}"
        )
    rid, rseq = obj.get("request_id"), obj.get("result_seq")
    if rid is None and rseq is None:
        raise InvalidPayload(f"{where}: expected request_id or result_seq (which result)")
    if rid is not None and (problem := request_id_problem(rid)) is not None:
        raise InvalidPayload(f"{where}: request_id: {problem}")
    if rseq is not None and not positive_int(rseq):
        raise InvalidPayload(f"{where}: result_seq: expected a positive integer, got {rseq!r:.60}")
    unknown = sorted(set(obj) - {"label", "request_id", "result_seq"})
    if unknown:
        raise InvalidPayload(
            f"{where}: {unknown[0]}: unknown field (expected label, request_id, result_seq)"
        )
    return obj


def check_results(payload: Any, where: str) -> dict[str, Any]:
    """A results batch: every row a result or a feedback row, each with a positive seq."""
    obj = object_of(payload, where)
    if not isinstance(obj.get("device"), str):
        raise InvalidPayload(f"{where}: device: expected a string, got {obj.get('device')!r:.60}")
    rows = obj.get("results")
    if not isinstance(rows, list):
        raise InvalidPayload(f"{where}: results: expected a list, got {rows!r:.60}")
    for i, row in enumerate(rows):
        at = f"{where}: results[{i}]"
        if not isinstance(row, dict):
            raise InvalidPayload(f"{at}: expected an object")
        keys = FEEDBACK_KEYS if "feedback" in row else RESULT_KEYS
        missing = [k for k in keys if k not in row]
        if missing:
            raise InvalidPayload(f"{at}: missing {', '.join(missing)}")
        if not positive_int(row["seq"]):
            raise InvalidPayload(f"{at}.seq: expected a positive integer, got {row['seq']!r:.60}")
        t = row["time"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise InvalidPayload(f"{at}.time: expected seconds since the epoch, got {t!r:.60}")
        if "feedback" in row:
            check_feedback(row["feedback"], f"{at}.feedback")
            continue
        for key in ("model", "version"):
            if not isinstance(row[key], str):
                raise InvalidPayload(f"{at}.{key}: expected a string, got {row[key]!r:.60}")
        rid = row.get("request_id")
        if rid is not None and (problem := request_id_problem(rid)) is not None:
            raise InvalidPayload(f"{at}.request_id: {problem}")
    return obj


# --- acknowledgements (collector -> device) ------------------------------------------

# An ack names the seq ranges of the batches one transaction committed; more than this
# many ranges go out as several acks.
MAX_ACK_RANGES = 1000


def ack(
    device: str, ranges: list[tuple[int, int]], *, collector: str | None = None,
    t: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``edge/devices/{device}/results/ack``: these rows are committed centrally.

    Each range ``[first, last]`` is a batch as the device sent it: every row the device
    held between first and last was in it, so the device may delete the whole range.
    """
    payload: dict[str, Any] = {
        "device": device,
        "time": rfc3339(t),
        "ranges": [[first, last] for first, last in ranges],
    }
    if collector:
        payload["collector"] = collector
    return check_ack(payload, "ack")


def check_ack(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    if not isinstance(obj.get("device"), str):
        raise InvalidPayload(f"{where}: device: expected a string, got {obj.get('device')!r:.60}")
    time_field(obj, "time", where, required=False)
    ranges = obj.get("ranges")
    if not isinstance(ranges, list) or not ranges:
        raise InvalidPayload(f"{where}: ranges: expected a non-empty list, got {ranges!r:.60}")
    if len(ranges) > MAX_ACK_RANGES:
        raise InvalidPayload(f"{where}: ranges: at most {MAX_ACK_RANGES}, got {len(ranges)}")
    for i, r in enumerate(ranges):
        if (
            not isinstance(r, list) or len(r) != 2
            or not all(positive_int(n) for n in r) or r[0] > r[1]
        ):  # fmt: skip
            raise InvalidPayload(
                f"{where}: ranges[{i}]: expected [first, last] with 1 <= first <= last,"
                f" got {r!r:.60}"
            )
    return obj


def ack_ranges(payload: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The ``(first, last)`` pairs of a checked ack."""
    return [(int(a), int(b)) for a, b in payload["ranges"]]
