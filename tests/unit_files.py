"""Reading systemd unit files in tests, and whether systemd-analyze can check them."""

from __future__ import annotations

import re
import shutil
import subprocess
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


def verify_in_scratch_root(unit: Path, exe: str, root: Path) -> tuple[int, str]:
    """``systemd-analyze verify`` of ``unit`` installed under ``root``: verify checks
    that ExecStart= exists, so ``exe`` is created there, with the system's units (the
    targets the unit refers to). Its exit code and output."""
    assert analyze is not None
    binary = root / exe.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    units = root / "usr/lib/systemd"
    units.mkdir(parents=True)
    for system in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system.is_dir():
            shutil.copytree(system, units / "system", symlinks=True, dirs_exist_ok=True)
            break
    target = root / "etc/systemd/system" / unit.name
    target.parent.mkdir(parents=True)
    shutil.copy(unit, target)
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", str(target)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def exposure(unit: Path) -> tuple[float, str, str]:
    """``systemd-analyze security``'s overall score of ``unit``, its word ("OK",
    "MEDIUM", ...) and the full report (for the failure message)."""
    assert analyze is not None
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return float(m.group(1)), m.group(2), proc.stdout
