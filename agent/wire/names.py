"""Names and versions as the wire allows them: one rule for every side.

A model, fleet or device name becomes an MQTT topic segment and a folder name on the
device, so it must be a plain single path component: letters, digits, ``_ . -``.
"""

from __future__ import annotations

import re

from agent.wire.errors import ManifestInvalid

NAME_PATTERN = "[A-Za-z0-9_.-]+"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.match(value) is not None


def check_name(kind: str, value: str) -> str:
    """Topic segments and folder names: ``[A-Za-z0-9_.-]+``, no wildcards, no slashes."""
    if not is_name(value):
        raise ValueError(f"{kind}: {value!r} must match {NAME_PATTERN}")
    return value


def parse_version(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``; versions compare numerically, not as text."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ManifestInvalid(f"version: {version!r} is not dotted numbers like 1.2.0")
    return tuple(int(p) for p in version.split("."))
