"""``edge-fleet shadow-report``: per device and fleet-wide figures from health and status."""

from __future__ import annotations

import json
import subprocess

from agent.wire import payloads
from fleet.shadow_report import build_report, render
from fleet.state import FleetState
from tests.fixtures.broker import Broker
from tests.fleet.test_rollouts_e2e import EDGE_FLEET
from tests.fleet.test_status import health_payload, status_payload


def shadow(compared: int, agreement: float, confusion: list[list[object]]) -> dict[str, object]:
    return payloads.shadow_summary(
        candidate="1.3.0", against="1.2.0", compared=compared, agreement=agreement,
        confusion=confusion, error=None, latency_ms={"active_p50": 0.4, "candidate_p50": 0.6},
        skipped=0, failed=0,
    )  # fmt: skip


def test_devices_and_fleet_figures_with_the_disagreements_first() -> None:
    fleet = FleetState()
    for device, compared, agreement, cells in (
        ("pi-1", 100, 0.9, [["a", "b", 10], ["a", "a", 90]]),
        ("pi-2", 300, 0.99, [["a", "b", 2], ["b", "a", 1], ["b", "b", 297]]),
    ):
        health = health_payload(device, "north")
        health["models"]["iris"]["shadow"] = shadow(compared, agreement, cells)
        fleet.apply(f"edge/devices/{device}/health", json.dumps(health).encode(), now=1.0)
    # pi-3: heard only through its retained status (no health within --wait).
    status = status_payload("pi-3", "north")
    status["models"]["iris"]["shadow"] = {"version": "1.3.0", "compared": 50, "agreed": 25}
    fleet.apply("edge/devices/pi-3/status", json.dumps(status).encode(), retained=True)
    fleet.apply("edge/devices/pi-4/health", json.dumps(health_payload("pi-4", "north")).encode())
    report = build_report(fleet.snapshot(), "iris")
    assert [d["device"] for d in report["devices"]] == ["pi-1", "pi-2", "pi-3"]
    f = report["fleet"]
    assert (f["compared"], f["agreed"], f["agreement"]) == (450, 90 + 297 + 25, round(412 / 450, 4))
    assert f["confusion"][:2] == [["a", "b", 12], ["b", "a", 1]]
    text = render(report, 160)
    assert "a -> b (10)" in text and "(in health)" in text
    assert "disagreements (active -> candidate): a -> b: 12, b -> a: 1" in text


def test_no_device_comparing_is_a_one_line_failure(broker: Broker) -> None:
    done = subprocess.run(
        [EDGE_FLEET, "shadow-report", "iris", "--wait", "0.5", "--broker", broker.operator_url,
         "--username", broker.operator.username, "--password-file",
         str(broker.operator.password_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("edge-fleet: error: iris: no device reports a shadow candidate")
    ), done.stderr
