"""The exporter shows drift per feature from the devices' health ``drift`` sections."""

from __future__ import annotations

import pytest

from agent.wire import payloads
from fleet.state import FleetState
from tests.fleet.test_exporter import msg, scrape_collector, value
from tests.fleet.test_status import health_payload


def test_drift_per_feature_score_and_rest_per_device() -> None:
    fleet = FleetState()
    scores = [("temp", 0.8, [0.1] * 10), ("speed", 0.05, [0.1] * 10), ("load", 0.02, [0.1] * 10)]
    health = health_payload("pi-1", "north")
    health["models"]["iris"]["drift"] = payloads.drift_summary(
        "1.2.0", 900, scores, 0.3, top_k=2, budget=2048
    )
    fleet.apply("edge/devices/pi-1/health", msg(health), now=1.0)
    # An agent without drift summaries: no drift series for it.
    fleet.apply("edge/devices/pi-2/health", msg(health_payload("pi-2", "north")), now=1.0)
    s = scrape_collector(fleet, now=2.0)
    one = {"device": "pi-1", "fleet": "north", "model": "iris", "version": "1.2.0"}
    assert value(s, "edge_fleet_model_drift_psi", **one, feature="temp") == 0.8
    assert value(s, "edge_fleet_model_drift_psi", **one, feature="speed") == 0.05
    assert value(s, "edge_fleet_model_drift_psi", **one, feature="load") is None  # in rest
    assert value(s, "edge_fleet_model_drift_rest_max_psi", **one) == 0.02
    assert value(s, "edge_fleet_model_drift_score", **one) == 0.8
    assert value(s, "edge_fleet_model_output_drift_psi", **one) == 0.3
    assert not [
        k for k in s if k[0].startswith("edge_fleet_model_drift") and ("device", "pi-2") in k[1]
    ]


def test_a_malformed_drift_section_is_an_invalid_message() -> None:
    fleet = FleetState()
    health = health_payload("pi-1", "north")
    health["models"]["iris"]["drift"] = {"version": "1.2.0", "top": [{"feature": "t", "psi": "x"}]}
    with pytest.raises(payloads.InvalidPayload, match=r"models.iris.drift: top\[0\]: psi"):
        fleet.apply("edge/devices/pi-1/health", msg(health), now=1.0)
    assert fleet.invalid_messages == 1
    s = scrape_collector(fleet, now=2.0)
    assert not [k for k in s if k[0] == "edge_fleet_model_drift_psi"]


def test_shadow_agreement_per_device_and_candidate() -> None:
    fleet = FleetState()
    health = health_payload("pi-1", "north")
    health["models"]["iris"]["shadow"] = payloads.shadow_summary(
        candidate="1.3.0", against="1.2.0", compared=800, agreement=0.95,
        confusion=[["a", "b", 40]], error=None, latency_ms={}, skipped=0, failed=0,
    )  # fmt: skip
    fleet.apply("edge/devices/pi-1/health", msg(health), now=1.0)
    s = scrape_collector(fleet, now=2.0)
    one = {"device": "pi-1", "fleet": "north", "model": "iris", "version": "1.2.0",
           "candidate": "1.3.0"}  # fmt: skip
    assert value(s, "edge_fleet_shadow_compared_rows", **one) == 800
    assert value(s, "edge_fleet_shadow_agreement", **one) == 0.95
    assert value(s, "edge_fleet_shadow_abs_error_p99", **one) is None


def test_canary_arms_per_device_with_their_versions() -> None:
    fleet = FleetState()
    health = health_payload("pi-1", "north")
    health["models"]["iris"]["canary"] = payloads.canary_summary(
        version="1.3.0", against="1.2.0", traffic=10,
        active=payloads.canary.canary_arm("1.2.0", 900, 0, 2.0),
        canary=payloads.canary.canary_arm("1.3.0", 100, 5, 8.0),
    )  # fmt: skip
    fleet.apply("edge/devices/pi-1/health", msg(health), now=1.0)
    s = scrape_collector(fleet, now=2.0)
    dev = {"device": "pi-1", "fleet": "north", "model": "iris"}
    assert value(s, "edge_fleet_canary_traffic_percent", **dev, version="1.3.0") == 10
    assert value(s, "edge_fleet_canary_requests", **dev, version="1.2.0", arm="active") == 900
    assert value(s, "edge_fleet_canary_requests", **dev, version="1.3.0", arm="canary") == 100
    assert value(s, "edge_fleet_canary_error_rate", **dev, version="1.3.0", arm="canary") == 0.05
    assert value(s, "edge_fleet_canary_p99_seconds", **dev, version="1.3.0", arm="canary") == 0.008
    health["models"]["iris"]["canary"] = {**health["models"]["iris"]["canary"], "traffic": 100}
    with pytest.raises(payloads.InvalidPayload, match=r"models.iris.canary: traffic: expected"):
        fleet.apply("edge/devices/pi-1/health", msg(health), now=3.0)
