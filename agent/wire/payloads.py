"""Every MQTT payload a device sends, built and checked here and nowhere else.

The device builds its retained status, health reports, deployment events and result
batches with these functions (batches and acks live in ``agent/wire/batches.py``, the
shared field checks in ``agent/wire/checks.py``; their names are here as well); the fleet side (status table, exporter, later the
collector) checks what it receives with the matching ``check_*``. A field added here is
added for both. Times are ``agent.wire.times.rfc3339`` throughout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent import __version__
from agent.wire import batches, canary, checks, drift, shadow
from agent.wire.checks import number, object_of, optional_int, optional_str, time_field
from agent.wire.names import name_problem
from agent.wire.targeting import tags_problem
from agent.wire.times import rfc3339

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
# Every artifact.urls entry failed; the broker chunks are downloaded instead.
ARTIFACT_FALLBACK = "artifact_fallback"
EVENTS = (
    DOWNLOADING, VERIFIED, ACTIVATED, REJECTED, ROLLED_BACK, NOT_IN_ROLLOUT, COMMAND,
    ARTIFACT_FALLBACK,
)  # fmt: skip
# Where an artifact came from (``artifact_source`` of ``verified`` and ``artifact_fallback``).
ORIGIN, BROKER_CHUNKS, STORE = "origin", "broker_chunks", "store"
ARTIFACT_SOURCES = (ORIGIN, BROKER_CHUNKS, STORE)
# A model's deployment state in the status (models[name].state); `reason` says why.
ACTIVE = "active"  # serving what is desired (or nothing is desired)
PROBATION = "probation"  # a new version watched against the previous one
INSTALLING = "installing"  # loading and checking a new version; the old one serves
RETRYING = "retrying"  # a delivery failed for now (missing chunk, full disk): tried again
FAILED = "failed"  # no version of it can be loaded
MODEL_STATES = (
    ACTIVE, PROBATION, DOWNLOADING, INSTALLING, REJECTED, RETRYING, ROLLED_BACK,
    NOT_IN_ROLLOUT, FAILED,
)  # fmt: skip
# desired.source: the device's own desired state or its fleet's.
DESIRED_SOURCES = ("device", "fleet")


# The error every check raises, naming the topic and the field.
InvalidPayload = checks.InvalidPayload


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
    tags: Mapping[str, str] | None = None,
    trusted_keys: list[str] | None = None,
) -> dict[str, Any]:
    """The retained ``edge/devices/{device}/status``: online/offline, since when, models.

    Per model: ``version`` (serving, or null), ``state`` (``MODEL_STATES``), ``reason``,
    ``serial`` and ``desired`` (``{version, serial, source, decision, reason}`` of the
    desired manifest that applies, or null); ``tags`` are the device's, ``trusted_keys``
    the ids of the publisher keys it trusts (``agent.wire.signing.key_id``).
    """
    payload: dict[str, Any] = {
        "device": device,
        "fleet": fleet,
        "state": state,
        "since": rfc3339(t),
        "agent_version": __version__,
        "tags": dict(tags or {}),
        "trusted_keys": list(trusted_keys or []),
        "models": dict(models),
    }
    if reason:
        payload["reason"] = reason
    return check_status(payload, "status")


def check_status(payload: Any, where: str) -> dict[str, Any]:
    """A status, of this agent or an older one: fields it lacks are not required."""
    obj = object_of(payload, where)
    if obj.get("state") not in STATES:
        raise InvalidPayload(
            f"{where}: state: expected 'online' or 'offline', got {obj.get('state')!r}"
        )
    time_field(obj, "since", where, required=False)
    tags = obj.get("tags", {})
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise InvalidPayload(f"{where}: tags: expected an object of strings, got {tags!r:.60}")
    keys = obj.get("trusted_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise InvalidPayload(f"{where}: trusted_keys: expected a list of key ids, got {keys!r:.60}")
    models = obj.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise InvalidPayload(f"{where}: models: expected an object of objects, got {models!r}")
    for name, m in models.items():
        _check_model_status(m, f"{where}: models.{name}")
    return obj


def _check_model_status(m: Mapping[str, Any], where: str) -> None:
    for key in ("version", "state", "reason"):
        optional_str(m, key, where)
    optional_int(m, "serial", where)
    shadow_of = m.get("shadow")
    if shadow_of is not None:
        if not isinstance(shadow_of, dict) or not isinstance(shadow_of.get("version"), str):
            raise InvalidPayload(
                f"{where}: shadow: expected an object with the candidate's version, got "
                f"{shadow_of!r:.60}"
            )
        optional_int(shadow_of, "compared", f"{where}.shadow")
        optional_int(shadow_of, "agreed", f"{where}.shadow")
    split = m.get("canary")
    if split is not None:  # before its first figures the status names no arms yet
        canary.check_canary({"arms": _NO_ARMS, **object_of(split, f"{where}.canary")},
                            f"{where}.canary")  # fmt: skip
    desired = m.get("desired")
    if desired is None:
        return
    if not isinstance(desired, dict):
        raise InvalidPayload(f"{where}: desired: expected an object or null, got {desired!r:.60}")
    at = f"{where}.desired"
    for key in ("version", "decision", "reason"):
        optional_str(desired, key, at)
    optional_int(desired, "serial", at)
    if desired.get("source") not in DESIRED_SOURCES:
        raise InvalidPayload(
            f"{at}: source: expected 'device' or 'fleet', got {desired.get('source')!r:.60}"
        )


# --- health ------------------------------------------------------------------------

HEALTH_NUMBERS = ("uptime_s", "cpu_percent", "disk_free_bytes", "soc_temp_c")
HEALTH_SECTIONS = ("memory", "buffer", "mqtt")
# Why the buffer dropped results (health buffer.dropped, edge_buffer_dropped_total). A
# report lists every reason, zeros included, so a counter always has a series.
DROP_REASONS = ("max_rows", "max_bytes", "max_age", "disk_full", "io_error")
# errors: the model's own failures; bad_requests: callers' refused requests (4xx).
MODEL_NUMBERS = ("inferences", "errors", "bad_requests", "p50_ms", "p99_ms")


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
    obj = object_of(payload, where)
    time_field(obj, "time", where, required=False)
    for key in HEALTH_NUMBERS:
        number(obj, key, where)
    for section in HEALTH_SECTIONS:
        value = obj.get(section, {})
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where}: {section}: expected an object, got {value!r}")
    dropped = obj.get("buffer", {}).get("dropped", {})
    if not isinstance(dropped, dict):
        raise InvalidPayload(f"{where}: buffer.dropped: expected an object, got {dropped!r:.60}")
    for reason in dropped:
        number(dropped, reason, f"{where}: buffer.dropped")
    models = obj.get("models", {})
    if not isinstance(models, dict):
        raise InvalidPayload(f"{where}: models: expected an object, got {models!r}")
    for name, m in models.items():
        if not isinstance(m, dict):
            raise InvalidPayload(f"{where}: models.{name}: expected an object, got {m!r}")
        for key in MODEL_NUMBERS:
            number(m, key, f"{where}: models.{name}")
        if m.get("drift") is not None:
            drift.check_drift(m["drift"], f"{where}: models.{name}.drift")
        if m.get("shadow") is not None:
            shadow.check_shadow(m["shadow"], f"{where}: models.{name}.shadow")
        if m.get("canary") is not None:
            canary.check_canary(m["canary"], f"{where}: models.{name}.canary")
    return obj


# The drift section of a model in health: built and checked in agent/wire/drift.py.
drift_summary = drift.drift_summary
check_drift = drift.check_drift
# The canary section (the two arms of a traffic split): agent/wire/canary.py; the
# status may carry it before the first figures, without arms.
_NO_ARMS = {a: {"version": "", "requests": 0, "errors": 0} for a in canary.ARMS}
canary_summary = canary.canary_summary
check_canary = canary.check_canary
# The shadow section (a candidate against the active version): agent/wire/shadow.py.
shadow_summary = shadow.shadow_summary
check_shadow = shadow.check_shadow


# --- events --------------------------------------------------------------------------


def event(device: str, name: str, *, t: float | None = None, **fields: Any) -> dict[str, Any]:
    """A deployment event (or a command's answer): ``{"device", "time", "event", ...}``.

    Fields that are None are left out, so an event names only what it knows.
    """
    payload: dict[str, Any] = {"device": device, "time": rfc3339(t), "event": name}
    payload.update({k: v for k, v in fields.items() if v is not None})
    return check_event(payload, "event")


def check_event(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    if obj.get("event") not in EVENTS:
        raise InvalidPayload(
            f"{where}: event: expected one of {', '.join(EVENTS)}, got {obj.get('event')!r}"
        )
    time_field(obj, "time", where, required=True)
    for key in ("device", "model", "version", "reason"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidPayload(f"{where}: {key}: expected a string, got {value!r:.60}")
    serial = obj.get("serial")
    if serial is not None and (not isinstance(serial, int) or isinstance(serial, bool)):
        raise InvalidPayload(f"{where}: serial: expected an integer, got {serial!r:.60}")
    _check_artifact_source(obj, where)
    return obj


def origin_errors(failures: list[tuple[str, str]]) -> list[dict[str, str]]:
    """``errors`` of an ``artifact_fallback`` event: each URL tried, with its failure."""
    return [{"url": url, "error": error} for url, error in failures]


def _check_artifact_source(obj: Mapping[str, Any], where: str) -> None:
    source = obj.get("artifact_source")
    if source is not None and source not in ARTIFACT_SOURCES:
        raise InvalidPayload(
            f"{where}: artifact_source: expected one of {', '.join(ARTIFACT_SOURCES)}, "
            f"got {source!r:.60}"
        )
    url = obj.get("url")
    if url is not None and not isinstance(url, str):
        raise InvalidPayload(f"{where}: url: expected a string, got {url!r:.60}")
    if obj.get("event") != ARTIFACT_FALLBACK:
        return
    errors = obj.get("errors")
    pairs = errors if isinstance(errors, list) else []
    if not pairs or not all(
        isinstance(e, dict) and isinstance(e.get("url"), str) and isinstance(e.get("error"), str)
        for e in pairs
    ):
        raise InvalidPayload(
            f"{where}: errors: expected a non-empty list of objects with strings url and "
            f"error, got {errors!r:.60}"
        )


# --- enrolment (operator -> operators, retained) ------------------------------------


def enrolment(
    device: str, fleet: str, tags: Mapping[str, str], *, t: float | None = None
) -> dict[str, Any]:
    """``edge/devices/{device}/enrolment``: how ``edge-fleet enroll`` made the device,
    so the fleet knows it before it ever connects (devices do not read it)."""
    payload = {"device": device, "fleet": fleet, "tags": dict(tags), "enrolled_at": rfc3339(t)}
    return check_enrolment(payload, "enrolment")


def check_enrolment(payload: Any, where: str) -> dict[str, Any]:
    obj = object_of(payload, where)
    for key in ("device", "fleet"):
        problem = name_problem(key, obj.get(key))
        if problem is not None:
            raise InvalidPayload(f"{where}: {problem}")
    problem = tags_problem("tags", obj.get("tags", {}))
    if problem is not None:
        raise InvalidPayload(f"{where}: {problem}")
    time_field(obj, "enrolled_at", where, required=True)
    return obj


# --- results, feedback, acks: built and checked in agent/wire/batches.py --------------
# The names stay here as well, so every payload is still ``payloads.<name>``.

RESULT_KEYS = batches.RESULT_KEYS
FEEDBACK_KEYS = batches.FEEDBACK_KEYS
MAX_REQUEST_ID = batches.MAX_REQUEST_ID
RESULTS_TAIL = batches.RESULTS_TAIL
MAX_ACK_RANGES = batches.MAX_ACK_RANGES
results_head = batches.results_head
result_json = batches.result_json
feedback_json = batches.feedback_json
request_id_problem = batches.request_id_problem
feedback = batches.feedback
check_feedback = batches.check_feedback
check_results = batches.check_results
ack = batches.ack
check_ack = batches.check_ack
ack_ranges = batches.ack_ranges
