"""Time on the wire: one RFC 3339 form everywhere (UTC, milliseconds, ``Z``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def rfc3339(t: float | None = None) -> str:
    """``2026-12-01T20:35:03.120Z``: every payload, manifest and pointer uses this form."""
    stamp = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time (with ``Z`` or an offset); ValueError when it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return stamp
