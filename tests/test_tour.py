"""The README's tour (scripts/tour.sh) runs as written: model to queried predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.broker import free_port_run
from tests.script_runs import ROOT, run_steps

pytestmark = pytest.mark.slow


def test_the_readme_tour_runs(tmp_path: Path) -> None:
    # Three consecutive free ports: devices, operators, the agent's HTTP.
    out = run_steps("tour.sh", "TOUR_PORT_BASE", free_port_run(3), tmp_path / "tour", timeout=300)
    assert '"request_id":"order-1"' in out and '{"recorded":true' in out
    # edge-fleet results printed the four predictions; accuracy: 1 of 2 labels right.
    assert out.count("order-") >= 8
    assert "tour: done" in out
    readme = (ROOT / "README.md").read_text()
    assert "scripts/tour.sh" in readme and "edge-fleet collect" in readme
