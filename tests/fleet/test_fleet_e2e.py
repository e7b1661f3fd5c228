"""A fleet of real `edge-agent run` processes on a real broker, seen by `edge-fleet`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.broker import Broker
from tests.fleet.test_exporter import Samples, exporter, scrape_until, value
from tests.fleet.test_status import broker_args

ROOT = Path(__file__).resolve().parents[2]
ROW = {"features": [[5.1, 3.5, 1.4, 0.2]]}
FLEET = {"dev-a1": "alpha", "dev-a2": "alpha", "dev-b1": "beta"}


def fleet_status(broker: Broker, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "fleet", "status", "--json", "--wait", "1.5", *extra,
         *broker_args(broker)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def status_until(
    broker: Broker, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        devices = {d["device"]: d for d in fleet_status(broker)["devices"]}
        if check(devices):
            return devices
        if time.monotonic() > deadline:
            raise AssertionError(f"edge-fleet status never matched: {json.dumps(devices)[:2000]}")


@pytest.mark.slow
def test_status_and_exporter_show_a_fleet_of_real_agents(
    broker: Broker, start_agent: Any, iris_package: Path
) -> None:
    agents = {}
    for device, fleet in FLEET.items():
        creds = broker.add_device(device, fleet)
        agents[device] = start_agent(
            {
                "device": {"id": device, "fleet": fleet},
                "mqtt": {
                    "url": broker.url,
                    "username": device,
                    "password_file": str(creds.password_file),
                },
                "health": {"interval_s": 1},
            },
            packages=[iris_package],
        )
    for _ in range(5):
        code, body = agents["dev-a1"].request("POST", "/predict", ROW)
        assert code == 200, body

    def all_reporting(devices: dict[str, dict[str, Any]]) -> bool:
        return set(devices) == set(FLEET) and all(
            d["state"] == "online" and d["health_age_s"] is not None for d in devices.values()
        )

    devices = status_until(broker, all_reporting)
    for device, fleet in FLEET.items():
        d = devices[device]
        assert d["fleet"] == fleet
        assert d["models"]["iris"]["version"] == "1.0.0"
        assert d["models"]["iris"]["state"] == "active"
        assert d["buffer"] is not None and d["buffer"]["rows"] >= 0
        assert 0 < d["agent_rss"] < 2**31 and d["cpu_percent"] is not None
    # Filtered by fleet.
    beta = fleet_status(broker, "--fleet", "beta")["devices"]
    assert [d["device"] for d in beta] == ["dev-b1"]

    with exporter(broker) as (_, url):

        def every_device_has_health(s: Samples) -> bool:
            return all(
                value(s, "edge_fleet_device_online", device=d, fleet=f) == 1.0
                and value(s, "edge_fleet_agent_rss_bytes", device=d, fleet=f) is not None
                for d, f in FLEET.items()
            )

        s = scrape_until(url, every_device_has_health, timeout=20)
        model = {"device": "dev-a1", "fleet": "alpha", "model": "iris", "version": "1.0.0"}
        assert value(s, "edge_fleet_model_info", **model, previous="", state="active") == 1.0
        # The five predictions land in one of the health windows the exporter sees.
        for _ in range(5):
            agents["dev-a1"].request("POST", "/predict", ROW)
        s = scrape_until(
            url, lambda s: (value(s, "edge_fleet_model_inferences_total", **model) or 0) >= 5
        )
        assert value(s, "edge_fleet_model_latency_p99_seconds", **model) is not None

        # kill -9: the broker publishes the last will, and both views say offline.
        agents["dev-a2"].kill()
        scrape_until(
            url,
            lambda s: value(s, "edge_fleet_device_online", device="dev-a2", fleet="alpha") == 0.0,
            timeout=20,
        )
    devices = status_until(broker, lambda d: d["dev-a2"]["state"] == "offline")
    assert devices["dev-a1"]["state"] == devices["dev-b1"]["state"] == "online"
