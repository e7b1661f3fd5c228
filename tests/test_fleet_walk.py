"""docs/fleet.md's walk (scripts/fleet-walk.sh) runs as written: three devices enrolled,
a model delivered, a bad version's self-driving rollout halted and rolled back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.broker import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_fleet_walk_runs(tmp_path: Path) -> None:
    # Five consecutive ports from a free one: devices, operators, three agents' HTTP.
    base = free_port()
    env = {**os.environ, "WALK_PORT_BASE": str(base)}
    done = subprocess.run(
        [str(ROOT / "scripts" / "fleet-walk.sh"), str(tmp_path / "walk")],
        capture_output=True, text=True, env=env, timeout=400, check=False,
    )  # fmt: skip
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((tmp_path / "walk").glob("*.log"))
    )
    assert done.returncode == 0, f"{done.stdout[-5000:]}\n{done.stderr[-3000:]}{logs}"
    out = done.stdout
    assert "3 device(s) enrolled" in out
    assert "iris (shop): 3/3 on 1.0.0" in out
    assert "halted at step 1/3 (34%): rejected 1 > 0; rolled back to 1.0.0" in out + done.stderr
    assert "walk: done" in out
    doc = (ROOT / "docs" / "fleet.md").read_text()
    assert "scripts/fleet-walk.sh" in doc and "edge-fleet enroll" in doc
