"""bench/fleet.py still runs: a small fleet of light devices converges (issue 14).

The figures themselves come from bench runs (bench/README.md); this only keeps the
bench and its light MQTT devices working as the wire format moves on.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.script_runs import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("artifacts", ["broker", "http"])
def test_light_devices_converge(artifacts: str) -> None:
    done = subprocess.run(
        [sys.executable, "bench/fleet.py", "--devices", "30", "--device", "lite",
         "--artifacts", artifacts, "--timeout", "60", "--connect-timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert re.search(r"^converged\s+30/30$", done.stdout, re.M), out[-3000:]
    assert re.search(r"^stage one exact\s+yes \d+/\d+$", done.stdout, re.M), out[-3000:]
    egress = "origin egress/device" if artifacts == "http" else "broker egress/device"
    assert re.search(rf"^{egress}\s+1\.\d\d MB$", done.stdout, re.M), out[-3000:]
