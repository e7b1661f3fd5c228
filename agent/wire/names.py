"""Names and versions as the wire allows them: one rule for every side.

A model, fleet or device name becomes an MQTT topic segment and a folder name on the
device, so it must be a plain single path component: letters, digits, ``_ . -``, and
not starting with a dot. That refuses ``.`` and ``..`` (which would escape the model
store) and names like ``.lock`` that would collide with the store's own files.
"""

from __future__ import annotations

import re

from agent.wire.errors import ManifestInvalid

NAME_PATTERN = "[A-Za-z0-9_-][A-Za-z0-9_.-]*"
NAME_RULE = "letters, digits, '_', '-' and '.', not starting with a dot"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.match(value) is not None


def name_problem(kind: str, value: object) -> str | None:
    """Why ``value`` is not a valid name, naming ``kind``; None when it is one."""
    if is_name(value):
        return None
    return f"{kind}: {value!r} is not a plain name ({NAME_RULE})"


def check_name(kind: str, value: str) -> str:
    """Topic segments and folder names; ValueError naming ``kind`` otherwise."""
    problem = name_problem(kind, value)
    if problem is not None:
        raise ValueError(problem)
    return value


def parse_version(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``; versions compare numerically, not as text."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ManifestInvalid(f"version: {version!r} is not dotted numbers like 1.2.0")
    return tuple(int(p) for p in version.split("."))
