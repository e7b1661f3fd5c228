"""``Batch``: what one ``Database.store()`` writes, prepared on the thread that reads MQTT.

Rows arrive checked by ``agent.wire.payloads``; here they become the tuples the
statements take, so the store itself does no per-row Python work. The per-row cost is
JSON encoding (the float text of the inputs, mostly), done once: ``outputs`` is written
around the encoded prediction instead of encoding the prediction twice. Values a
database would refuse (NaN in JSON, a NUL or a lone surrogate in text, a seq past
bigint) are repaired or refused here, so one odd payload cannot fail a transaction
again and again.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
import time
from collections.abc import Callable
from typing import Any

from agent.wire.payloads import InvalidPayload
from agent.wire.times import parse_rfc3339

MAX_BIGINT = 2**63 - 1


def _encoder() -> Callable[[Any], str]:
    # Compact, ASCII (no encoding can fail later), no NaN (PostgreSQL's json refuses
    # it). The C encoder is built once and reused: JSONEncoder.encode builds one per
    # call, a quarter of the cost of encoding a small result.
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)
        return encoder.encode
    iterencode = make(
        None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return json.encoder.encode_basestring_ascii(value)
        return "".join(iterencode(value, 0))

    return encode


_encode_std = _encoder()

try:  # orjson (the collector extra) encodes a result in a tenth of the time
    import orjson
except ImportError:  # pragma: no cover - the standard library's encoder then
    orjson = None  # type: ignore[assignment]


def _encode(value: Any) -> str:
    """Compact JSON text; orjson when installed, the standard library otherwise.

    orjson writes NaN and infinities as null (what ``_finite`` does) and refuses what it
    cannot encode exactly (a lone surrogate, an integer past 64 bits): those go to the
    standard encoder, which repairs or refuses them the documented way.
    """
    if orjson is not None:
        try:
            return orjson.dumps(value).decode()
        except (TypeError, ValueError):
            pass
    return _encode_std(value)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def json_text(value: Any) -> str | None:
    """The JSON text stored for ``value``; None stays SQL NULL."""
    if value is None:
        return None
    try:
        return _encode(value)
    except ValueError:  # NaN or an infinity
        return _encode(_finite(value))


def clean_text(value: Any) -> str | None:
    """A string any database takes: NUL and lone surrogates become U+FFFD."""
    if value is None:
        return None
    text = str(value)
    if text.isprintable():
        return text
    return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in text)


def epoch(value: Any, default: float) -> float:
    """An RFC 3339 time of a payload as epoch seconds; ``default`` when absent or bad."""
    try:
        return parse_rfc3339(value).timestamp()
    except (ValueError, TypeError, OverflowError):
        return default


def _feedback(device: str, row: dict[str, Any]) -> tuple[Any, ...]:
    body = row["feedback"]
    result_seq = body.get("result_seq")
    return (
        device,
        row["seq"],
        float(row["time"]),
        clean_text(body.get("request_id")),
        result_seq if result_seq is None or result_seq <= MAX_BIGINT else None,
        json_text(body["label"]),
    )


class Batch:
    """What one transaction stores. Not thread-safe: one thread fills it, then hands it over."""

    def __init__(self) -> None:
        # device -> result tuples in STAGED_RESULTS column order
        self.results: dict[str, list[tuple[Any, ...]]] = {}
        self.feedback: list[tuple[Any, ...]] = []
        self.health: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []
        self.status: list[tuple[Any, ...]] = []
        # For the devices summary: device -> (newest seq, its time), device -> fleet
        # (None until a health report or status names it).
        self.newest: dict[str, tuple[int, float]] = {}
        self.fleets: dict[str, str | None] = {}
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add_results(self, device: str, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Add the checked rows of one results message (results and feedback rows);
        returns its ``(first, last)`` seq range, ``(0, 0)`` when it has no rows."""
        if not rows:
            return 0, 0
        # Built aside and added at the end: a message refused midway leaves nothing behind.
        out: list[tuple[Any, ...]] = []
        feedback: list[tuple[Any, ...]] = []
        first, last, last_time = MAX_BIGINT, 0, 0.0
        model = version = clean_model = clean_version = None
        for row in rows:
            seq = row["seq"]
            if seq > MAX_BIGINT:
                raise InvalidPayload(f"results: seq {seq} is past the largest 64-bit integer")
            first = min(first, seq)
            if seq > last:
                last, last_time = seq, row["time"]
            if "feedback" in row:
                feedback.append(_feedback(device, row))
                continue
            if row["model"] != model or row["version"] != version:
                model, version = row["model"], row["version"]
                clean_model, clean_version = clean_text(model), clean_text(version)
            outputs = row["outputs"]
            prediction = outputs.get("prediction") if type(outputs) is dict else None
            if prediction is None:
                predicted, encoded = None, json_text(outputs)
            else:
                # Prediction first, encoded once, and the rest of the outputs after it.
                predicted = json_text(prediction)
                rest = {k: v for k, v in outputs.items() if k != "prediction"}
                encoded = '{"prediction":' + str(predicted)
                encoded += "," + str(json_text(rest))[1:] if rest else "}"
            latency = row["latency_ms"]
            if type(latency) is not float:
                latency = float(latency) if type(latency) is int else None
            elif not math.isfinite(latency):
                latency = None
            request_id = row.get("request_id")
            out.append(
                (
                    device,
                    seq,
                    float(row["time"]),
                    clean_model,
                    clean_version,
                    json_text(row["inputs"]),
                    encoded,
                    predicted,
                    latency,
                    request_id,
                )
            )
        self.results.setdefault(device, []).extend(out)
        self.feedback.extend(feedback)
        self._rows += len(rows)
        self._saw(device, last, float(last_time))
        self._fleet(device, None)
        return first, last

    def add_health(self, device: str, report: dict[str, Any]) -> None:
        """A checked health report; its ``time`` (the device's clock) is the key."""
        now = time.time()
        fleet = report.get("fleet")
        fleet = clean_text(fleet) if isinstance(fleet, str) else None
        self.health.append((device, epoch(report.get("time"), now), fleet, json_text(report)))
        self._rows += 1
        self._fleet(device, fleet)

    def add_event(self, device: str, event: dict[str, Any], raw: bytes) -> None:
        """A checked deployment event; ``raw`` is the payload as received (its digest
        keeps a redelivered event from being stored twice)."""
        serial = event.get("serial")
        if not isinstance(serial, int) or abs(serial) > MAX_BIGINT:
            serial = None
        self.events.append(
            (
                device,
                epoch(event.get("time"), time.time()),
                clean_text(event.get("event")),
                clean_text(event.get("model")),
                clean_text(event.get("version")),
                serial,
                clean_text(event.get("reason")),
                json_text(event),
                hashlib.sha256(raw).hexdigest(),
            )
        )
        self._rows += 1
        self._fleet(device, None)

    def add_status(self, device: str, status: dict[str, Any]) -> None:
        """A checked status; (device, since, state) is stored once, however often the
        broker sends the retained message again."""
        fleet = status.get("fleet")
        fleet = clean_text(fleet) if isinstance(fleet, str) else None
        self.status.append(
            (
                device,
                epoch(status.get("since"), time.time()),
                clean_text(status.get("state")),
                fleet,
                json_text(status),
            )
        )
        self._rows += 1
        self._fleet(device, fleet)

    def _saw(self, device: str, seq: int, t: float) -> None:
        known = self.newest.get(device)
        if known is None or seq > known[0]:
            self.newest[device] = (seq, t)

    def _fleet(self, device: str, fleet: str | None) -> None:
        if fleet is not None:
            self.fleets[device] = fleet
        else:
            self.fleets.setdefault(device, None)


# --- feedback against its result -------------------------------------------------------


def _same(label: Any, predicted: Any) -> bool:
    if label == predicted:
        return True
    # A label posted as "1" for a model predicting 1 (or the other way round).
    if isinstance(label, str) != isinstance(predicted, str):
        text, number = (label, predicted) if isinstance(label, str) else (predicted, label)
        if isinstance(number, int | float) and not isinstance(number, bool):
            try:
                return float(text) == number
            except ValueError:
                return False
    return False


def score(label: Any, prediction: Any) -> tuple[int | None, int]:
    """``(correct, total)`` of a feedback label against its result's prediction.

    total is the number of labels (a scalar is one); correct counts the labels equal to
    the prediction at the same row, None when the result has no prediction to compare.
    """
    labels = label if isinstance(label, list) else [label]
    if not isinstance(prediction, list):
        return None, len(labels)
    return sum(1 for a, b in zip(labels, prediction, strict=False) if _same(a, b)), len(labels)
