"""`edge-fleet exporter`: the retained rollout plans as ``edge_fleet_rollout_*`` series."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from fleet.exporter import FleetCollector
from fleet.exporter_rollouts import RolloutPlans, read_plan
from fleet.state import FleetState
from tests.fleet.rollout_plan import T0, plan
from tests.fleet.test_exporter import Samples, parse, scrape_collector, value

TOPIC = "edge/fleets/north/models/iris/rollout"


def scrape(plans: RolloutPlans, now: float) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(FleetState(), clock=lambda: now, rollouts=plans))
    return parse(generate_latest(registry).decode())


ROLLOUT = {"fleet": "north", "model": "iris", "version": "1.4.0"}


def test_a_running_rollout_is_served_with_its_state_percent_and_ages() -> None:
    plans = RolloutPlans()
    assert plans.receive(TOPIC, json.dumps(plan()).encode())
    s = scrape(plans, now=T0 + 700)
    assert value(s, "edge_fleet_rollout_state", **ROLLOUT, state="running") == 1.0
    for other in ("halted", "done", "aborted"):  # every state has a series: 0 is not a gap
        assert value(s, "edge_fleet_rollout_state", **ROLLOUT, state=other) == 0.0
    assert value(s, "edge_fleet_rollout_percent", **ROLLOUT) == 10.0
    assert value(s, "edge_fleet_rollout_step", **ROLLOUT) == 1.0
    assert value(s, "edge_fleet_rollout_step_interval_seconds", **ROLLOUT) == 600.0
    assert value(s, "edge_fleet_rollout_step_age_seconds", **ROLLOUT) == 100.0
    assert value(s, "edge_fleet_rollout_updated_age_seconds", **ROLLOUT) == 50.0
    assert value(s, "edge_fleet_rollout_info", **ROLLOUT, state="running", reason="",
                 halt_if="rejected>2% or rolled_back>1%") == 1.0  # fmt: skip
    assert value(s, "edge_fleet_rollouts", state="running") == 1.0
    assert value(s, "edge_fleet_rollouts", state="halted") == 0.0


def test_halted_rollout_names_its_reason_and_unpublish_removes_it() -> None:
    plans = RolloutPlans()
    plans.receive(TOPIC, json.dumps(plan()).encode())
    halted = plan(state="halted", reason="rejected 3.0% > 2% (3 of 100 devices)")
    plans.receive(TOPIC, json.dumps(halted).encode())
    s = scrape(plans, now=T0 + 700)
    assert value(s, "edge_fleet_rollout_state", **ROLLOUT, state="halted") == 1.0
    assert value(s, "edge_fleet_rollout_state", **ROLLOUT, state="running") == 0.0
    info = [dict(k[1]) for k in s if k[0] == "edge_fleet_rollout_info"]
    assert [i["reason"] for i in info] == ["rejected 3.0% > 2% (3 of 100 devices)"]
    assert value(s, "edge_fleet_rollouts", state="halted") == 1.0
    plans.receive(TOPIC, b"")  # unpublish clears the retained plan
    s = scrape(plans, now=T0 + 700)
    assert not [k for k in s if k[0].startswith("edge_fleet_rollout_")]
    assert value(s, "edge_fleet_rollouts", state="halted") == 0.0


def test_plans_are_read_leniently_and_the_topic_names_fleet_and_model() -> None:
    plans = RolloutPlans()
    # Half a plan, by hand, with a newer field and a state this exporter does not know:
    # what can be read is served, the rest is left out.
    odd = {"version": "2.0.0", "state": "paused", "percent": "ten", "future": [1, 2],
           "fleet": "someone-else", "step_started_at": "yesterday"}  # fmt: skip
    plans.receive("edge/fleets/south/models/wine/rollout", json.dumps(odd).encode())
    s = scrape(plans, now=T0)
    wine = {"fleet": "south", "model": "wine", "version": "2.0.0"}
    assert value(s, "edge_fleet_rollout_state", **wine, state="paused") == 1.0
    assert value(s, "edge_fleet_rollout_state", **wine, state="running") == 0.0
    assert value(s, "edge_fleet_rollout_percent", **wine) is None
    assert value(s, "edge_fleet_rollout_step_age_seconds", **wine) is None
    # Not JSON: counted as invalid, the previous plan is kept.
    plans.receive("edge/fleets/south/models/wine/rollout", b"{not json")
    s = scrape(plans, now=T0)
    assert value(s, "edge_fleet_rollout_state", **wine, state="paused") == 1.0
    assert value(s, "edge_fleet_exporter_invalid_messages_total") == 1.0
    # Other topics are not rollouts.
    assert not plans.receive("edge/fleets/south/models/wine/desired", b"{}")
    assert not plans.receive("edge/devices/pi-1/status", b"{}")
    assert read_plan("f", "m", b"[1, 2]") is None
    long = read_plan("f", "m", json.dumps({"reason": "x" * 500}).encode())
    assert long is not None and len(long.reason) == 200


def test_collector_without_plans_serves_zero_rollouts() -> None:
    s = scrape_collector(FleetState(), now=T0)
    assert value(s, "edge_fleet_rollouts", state="halted") == 0.0
