"""Running a script that shows a user's steps (scripts/tour.sh, scripts/fleet-walk.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_steps(script: str, port_env: str, port_base: int, work: Path, timeout: float) -> str:
    """Run ``scripts/SCRIPT WORK`` with its ports from ``port_base``; its stdout, or an
    AssertionError with the output's tail and the tail of every ``*.log`` in WORK."""
    env = {**os.environ, port_env: str(port_base)}
    done = subprocess.run(
        [str(ROOT / "scripts" / script), str(work)],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted(work.glob("*.log"))
    )
    assert done.returncode == 0, f"{done.stdout[-5000:]}\n{done.stderr[-3000:]}{logs}"
    return done.stdout + done.stderr
