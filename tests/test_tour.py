"""The README's tour (scripts/tour.sh) runs as written: model to queried predictions."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.broker import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_readme_tour_runs(tmp_path: Path) -> None:
    # Three consecutive free ports: devices, operators, the agent's HTTP.
    base = free_port()
    env = {**os.environ, "TOUR_PORT_BASE": str(base)}
    done = subprocess.run(
        [str(ROOT / "scripts" / "tour.sh"), str(tmp_path / "tour")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((tmp_path / "tour").glob("*.log"))
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-3000:]}{logs}"
    out = done.stdout
    assert '"request_id":"order-1"' in out and '{"recorded":true' in out
    # edge-fleet results printed the four predictions; accuracy: 1 of 2 labels right.
    assert out.count("order-") >= 8
    assert "tour: done" in out
    readme = (ROOT / "README.md").read_text()
    assert "scripts/tour.sh" in readme and "edge-fleet collect" in readme
