"""docs/fleet.md's walk (scripts/fleet-walk.sh) runs as written: three devices enrolled,
a model delivered, a bad version's self-driving rollout halted and rolled back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.broker import free_port_run
from tests.script_runs import ROOT, run_steps

pytestmark = pytest.mark.slow


def test_the_fleet_walk_runs(tmp_path: Path) -> None:
    # Five consecutive free ports: devices, operators, three agents' HTTP.
    out = run_steps("fleet-walk.sh", "WALK_PORT_BASE", free_port_run(5), tmp_path / "walk", 400)
    assert "3 device(s) enrolled" in out
    assert "iris (shop): 3/3 on 1.0.0" in out
    assert "halted at step 1/3 (34%): rejected 1 > 0; rolled back to 1.0.0" in out
    assert "walk: done" in out
    doc = (ROOT / "docs" / "fleet.md").read_text()
    assert "scripts/fleet-walk.sh" in doc and "edge-fleet enroll" in doc
