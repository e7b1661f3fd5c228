"""The field checks every payload checker shares, and the error they raise.

``InvalidPayload`` names the topic (``where``) and the field; ``agent.wire.payloads`` and
``agent.wire.batches`` build their checks from these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent.wire.errors import EdgeError
from agent.wire.times import parse_rfc3339


class InvalidPayload(EdgeError):
    """A payload that is not the documented shape; the message names the topic and field."""

    status = 400


def object_of(payload: Any, where: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidPayload(f"{where}: expected a JSON object, got {type(payload).__name__}")
    return payload


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def required_str(payload: Mapping[str, Any], key: str, where: str) -> None:
    value = payload.get(key)
    if not isinstance(value, str):
        raise InvalidPayload(f"{where}: {key}: expected a string, got {value!r:.60}")


def optional_str(payload: Mapping[str, Any], key: str, where: str) -> None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidPayload(f"{where}: {key}: expected a string or null, got {value!r:.60}")


def optional_int(payload: Mapping[str, Any], key: str, where: str) -> None:
    value = payload.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidPayload(f"{where}: {key}: expected an integer or null, got {value!r:.60}")


def number(payload: Mapping[str, Any], key: str, where: str) -> None:
    value = payload.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value)
    ):
        raise InvalidPayload(f"{where}: {key}: expected a number, got {value!r}")


def time_field(payload: Mapping[str, Any], key: str, where: str, *, required: bool) -> None:
    value = payload.get(key)
    if value is None:
        if required:
            raise InvalidPayload(f"{where}: {key}: missing")
        return
    try:
        parse_rfc3339(value)
    except ValueError:
        raise InvalidPayload(f"{where}: {key}: {value!r:.60} is not an RFC 3339 time") from None
