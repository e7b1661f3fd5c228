"""Reading systemd unit files in tests, and whether systemd-analyze can check them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None,
    reason="systemd-analyze not installed (apt-get install systemd): unit not verified",
)


def directives(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the unit; a key may repeat (SystemCallFilter=)."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def one_of(path: Path) -> Callable[[str], str]:
    """``one(key)``: the value of a key the unit must set exactly once."""

    def one(key: str) -> str:
        values = directives(path)[key]
        assert len(values) == 1, f"{key}= set {len(values)} times"
        return values[0]

    return one
