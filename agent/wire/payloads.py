"""Every MQTT payload a device sends, built and checked here and nowhere else.

The device builds its retained status, health reports, deployment events and result
batches with these functions; the fleet side (status table, exporter, later the
collector) checks what it receives with the matching ``check_*``. A field added here is
added for both. Times are ``agent.wire.times.rfc3339`` throughout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.wire.errors import EdgeError
from agent.wire.times import parse_rfc3339, rfc3339

ONLINE, OFFLINE = "online", "offline"
STATES = (ONLINE, OFFLINE)
# Deployment events on edge/devices/{device}/events (docs/protocol.md).
DOWNLOADING = "downloading"
VERIFIED = "verified"
ACTIVATED = "activated"
REJECTED = "rejected"
ROLLED_BACK = "rolled_back"
NOT_IN_ROLLOUT = "not_in_rollout"
COMMAND = "command"
EVENTS = (DOWNLOADING, VERIFIED, ACTIVATED, REJECTED, ROLLED_BACK, NOT_IN_ROLLOUT, COMMAND)


class InvalidPayload(EdgeError):
    """A payload that is not the documented shape; the message names the topic and field."""

    status = 400


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as every payload travels."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def decode(data: bytes | bytearray | str, where: str) -> dict[str, Any]:
    """A JSON object from a payload, or InvalidPayload naming ``where``."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidPayload(f"{where}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidPayload(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


# --- status (retained; also the last will) -----------------------------------------


def status(
    device: str,
    fleet: str,
    state: str,
    models: Mapping[str, Any],
    *,
    reason: str | None = None,
    t: float | None = None,
) -> dict[str, Any]:
    """The retained ``edge/devices/{device}/status``: online/offline, since when, models."""
    payload: dict[str, Any] = {
        "device": device,
        "fleet": fleet,
        "state": state,
        "since": rfc3339(t),
        "agent_version": __version__,
        "models": dict(models),
    }
    if reason:
        payload["reason"] = reason
    return check_status(payload, "status")


def check_status(payload: Any, where: str) -> dict[str, Any]:
    obj = _object(payload, where)
    if obj.get("state") not in STATES:
        raise InvalidPayload(
            f"{where}: state: expected 'online' or 'offline', got {obj.get('state')!r}"
        )
    _time(obj, "since", where, required=False)
    models = obj.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise InvalidPayload(f"{where}: models: expected an object of objects, got {models!r}")
    return obj


# --- health ------------------------------------------------------------------------

HEALTH_NUMBERS = ("uptime_s", "cpu_percent", "disk_free_bytes", "soc_temp_c")
HEALTH_SECTIONS = ("memory", "buffer", "mqtt")
MODEL_NUMBERS = ("inferences", "errors", "p50_ms", "p99_ms")


def health(
    device: str, fleet: str, fields: Mapping[str, Any], *, t: float | None = None
) -> dict[str, Any]:
    """``edge/devices/{device}/health``: the collected figures under the common head."""
    payload: dict[str, Any] = {
        "device": device,
        "fleet": fleet,
        "time": rfc3339(t),
        "agent_version": __version__,
        **fields,
    }
    return check_health(payload, "health")


def check_health(payload: Any, where: str) -> dict[str, Any]:
    obj = _object(payload, where)
    _time(obj, "time", where, required=False)
    for key in HEALTH_NUMBERS:
        _number(obj, key, where)
    for section in HEALTH_SECTIONS:
        value = obj.get(section, {})
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where}: {section}: expected an object, got {value!r}")
    models = obj.get("models", {})
    if not isinstance(models, dict):
        raise InvalidPayload(f"{where}: models: expected an object, got {models!r}")
    for name, m in models.items():
        if not isinstance(m, dict):
            raise InvalidPayload(f"{where}: models.{name}: expected an object, got {m!r}")
        for key in MODEL_NUMBERS:
            _number(m, key, f"{where}: models.{name}")
    return obj


# --- events --------------------------------------------------------------------------


def event(device: str, name: str, *, t: float | None = None, **fields: Any) -> dict[str, Any]:
    """A deployment event (or a command's answer): ``{"device", "time", "event", ...}``.

    Fields that are None are left out, so an event names only what it knows.
    """
    payload: dict[str, Any] = {"device": device, "time": rfc3339(t), "event": name}
    payload.update({k: v for k, v in fields.items() if v is not None})
    return check_event(payload, "event")


def check_event(payload: Any, where: str) -> dict[str, Any]:
    obj = _object(payload, where)
    if obj.get("event") not in EVENTS:
        raise InvalidPayload(
            f"{where}: event: expected one of {', '.join(EVENTS)}, got {obj.get('event')!r}"
        )
    _time(obj, "time", where, required=True)
    for key in ("device", "model", "version", "reason"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidPayload(f"{where}: {key}: expected a string, got {value!r:.60}")
    serial = obj.get("serial")
    if serial is not None and (not isinstance(serial, int) or isinstance(serial, bool)):
        raise InvalidPayload(f"{where}: serial: expected an integer, got {serial!r:.60}")
    return obj


# --- results -------------------------------------------------------------------------

RESULT_KEYS = ("seq", "time", "model", "version", "inputs", "outputs", "latency_ms")


def results_head(device: str) -> bytes:
    """The start of a results batch; the forwarder appends joined result objects and
    ``results_tail`` without re-parsing rows that are JSON already."""
    return f'{{"device":{json.dumps(device)},"results":['.encode()


RESULTS_TAIL = b"]}"


def result_json(
    seq: int, *, t: float, model: str, version: str, inputs: str, outputs: str, latency_ms: float
) -> str:
    """One result object of a batch; ``inputs``/``outputs`` are JSON text already."""
    return (
        f'{{"seq":{seq},"time":{t!r},"model":{json.dumps(model)},'
        f'"version":{json.dumps(version)},"inputs":{inputs},'
        f'"outputs":{outputs},"latency_ms":{latency_ms!r}}}'
    )


def check_results(payload: Any, where: str) -> dict[str, Any]:
    obj = _object(payload, where)
    if not isinstance(obj.get("device"), str):
        raise InvalidPayload(f"{where}: device: expected a string, got {obj.get('device')!r:.60}")
    rows = obj.get("results")
    if not isinstance(rows, list):
        raise InvalidPayload(f"{where}: results: expected a list, got {rows!r:.60}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidPayload(f"{where}: results[{i}]: expected an object")
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing:
            raise InvalidPayload(f"{where}: results[{i}]: missing {', '.join(missing)}")
        seq = row["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise InvalidPayload(f"{where}: results[{i}].seq: expected a positive integer")
    return obj


# --- shared checks -------------------------------------------------------------------


def _object(payload: Any, where: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidPayload(f"{where}: expected a JSON object, got {type(payload).__name__}")
    return payload


def _number(payload: Mapping[str, Any], key: str, where: str) -> None:
    value = payload.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value)
    ):
        raise InvalidPayload(f"{where}: {key}: expected a number, got {value!r}")


def _time(payload: Mapping[str, Any], key: str, where: str, *, required: bool) -> None:
    value = payload.get(key)
    if value is None:
        if required:
            raise InvalidPayload(f"{where}: {key}: missing")
        return
    try:
        parse_rfc3339(value)
    except ValueError:
        raise InvalidPayload(f"{where}: {key}: {value!r:.60} is not an RFC 3339 time") from None
