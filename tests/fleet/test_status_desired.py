"""`edge-fleet status` against a real mosquitto: desired against actual, reasons, summaries.

The operator account stands in for devices and publisher here (retained status and
desired manifests in the shapes the agent and `edge-fleet publish` write); the same
views against real agents are in tests/fleet/test_views_e2e.py.
"""

from __future__ import annotations

import json
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.wire.topics import rollout_bucket
from tests.fixtures.broker import Broker
from tests.fleet.test_status import broker_args, publish, run_status, status_payload

SALT = "north/iris"
REFUSED = "delivery of 1.3.0 refused: parity: probabilities row 0 differs by 0.3 (tolerance 1e-05)"


def fleet_manifest(version: str, serial: int, percent: float = 100, **extra: Any) -> dict[str, Any]:
    rollout: dict[str, Any] = {"percent": percent, "salt": SALT, **extra}
    return {
        "name": "iris",
        "version": version,
        "serial": serial,
        "issued_at": "2026-05-01T12:00:00.000Z",
        "artifact": {"file": "model.onnx", "size": 10, "sha256": "ab" * 32},
        "rollout": rollout,
        "signature": {"alg": "ed25519", "key_id": "k1", "value": "x"},
    }


def iris(
    version: str, state: str = "active", reason: str | None = None, **more: Any
) -> dict[str, Any]:
    return {"iris": {"version": version, "previous": None, "state": state, "serial": 3,
                     "reason": reason, **more}}  # fmt: skip


def split(percent: float, n: int = 2) -> tuple[list[str], list[str]]:
    """``n`` device ids inside ``percent`` of the salt's buckets and ``n`` outside."""
    inside, outside = [], []
    for i in range(1000):
        name = f"pi-{i:03d}"
        (inside if rollout_bucket(SALT, name) < percent else outside).append(name)
    return inside[:n], outside[:n]


@pytest.fixture
def client(broker: Broker) -> Any:
    c = broker.client()
    yield c
    c.disconnect()
    c.loop_stop()


def test_a_device_that_refused_the_desired_version_is_rejected_with_its_reason(
    broker: Broker, client: mqtt.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    # The device serves 1.2.0 and says "active" (it still serves): the refusal of 1.3.0
    # is only in its reason. Before issue 13 status printed "active" and dropped it.
    publish(
        client, "edge/fleets/north/models/iris/desired", fleet_manifest("1.3.0", 9), retain=True
    )
    publish(client, "edge/devices/pi-1/status",
            status_payload("pi-1", "north", models=iris("1.2.0", reason=REFUSED)), retain=True)  # fmt: skip
    code, out, err = run_status(capsys, "--json", "--wait", "0.3", *broker_args(broker))
    assert code == 0, err
    model = json.loads(out)["devices"][0]["models"]["iris"]
    assert model["version"] == "1.2.0" and model["state"] == "active"  # the device's word, kept
    assert model["reason"] == REFUSED
    assert model["desired"] == {"version": "1.3.0", "serial": 9, "source": "fleet"}
    assert model["deployment"] == {"state": "rejected", "reason": REFUSED, "targeted": True}
    summary = json.loads(out)["summary"]
    assert [(s["fleet"], s["model"], s["line"]) for s in summary] == [
        ("north", "iris", "0/1 on 1.3.0, 1 rejected")
    ]

    code, out, _ = run_status(capsys, "--wait", "0.3", *broker_args(broker))
    lines = out.splitlines()
    header, row, why = lines[0], lines[1], lines[2:4]
    cells = row.split()
    assert cells[:5] == ["pi-1", "iris", "1.2.0", "1.3.0", "rejected"]  # one fleet: no FLEET
    assert "FLEET" not in header
    # The reason is the point of the row: wrapped under it, not cut.
    assert all(w.startswith("    ") for w in why)
    assert " ".join(w.strip() for w in why) == REFUSED
    assert lines[-2:] == ["iris (north): 0/1 on 1.3.0, 1 rejected", "1 devices, 1 online"]
    assert max(len(line) for line in lines) <= 80


def test_summary_counts_the_rollout_and_names_the_plan(
    broker: Broker, client: mqtt.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    inside, outside = split(50, 3)
    publish(client, "edge/fleets/north/models/iris/desired", fleet_manifest("1.4.0", 12, 50),
            retain=True)  # fmt: skip
    plan = {"schema": 1, "fleet": "north", "model": "iris", "version": "1.4.0",
            "steps": [1, 10, 50, 100], "step": 2, "percent": 50, "state": "running",
            "reason": None}  # fmt: skip
    publish(client, "edge/fleets/north/models/iris/rollout", plan, retain=True)
    publish(client, f"edge/devices/{inside[0]}/status",
            status_payload(inside[0], "north", models=iris("1.4.0")), retain=True)  # fmt: skip
    publish(client, f"edge/devices/{inside[1]}/status",
            status_payload(inside[1], "north", models=iris("1.3.0", "rolled_back",
                           "probation of 1.4.0: 5 errors in 20 requests")), retain=True)  # fmt: skip
    bucket = rollout_bucket(SALT, outside[0])
    publish(client, f"edge/devices/{outside[0]}/status",
            status_payload(outside[0], "north", models=iris("1.3.0")), retain=True)  # fmt: skip
    # Offline inside the rollout (outside it, it would simply be not in rollout).
    publish(client, f"edge/devices/{inside[2]}/status",
            status_payload(inside[2], "north", state="offline", models=iris("1.3.0")),
            retain=True)  # fmt: skip
    code, out, err = run_status(capsys, "--wait", "0.3", *broker_args(broker))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-3:-1] == [
        "iris (north): 1/4 on 1.4.0, 1 rolled back, 1 not in rollout, 1 offline",
        "    rollout running 3/4 (50%)",
    ]
    assert lines[-1] == "4 devices, 3 online"
    assert f"    not in rollout (bucket {bucket} >= 50%)" in lines
    assert "    probation of 1.4.0: 5 errors in 20 requests" in lines

    code, out, _ = run_status(capsys, "--json", "--wait", "0.3", *broker_args(broker))
    doc = json.loads(out)
    (summary,) = doc["summary"]
    assert summary["total"] == 4 and summary["on_desired"] == 1
    assert (summary["rolled_back"], summary["not_in_rollout"], summary["offline"]) == (1, 1, 1)
    assert summary["rollout"]["state"] == "running" and summary["rollout"]["step"] == 2
    assert doc["online"] == 3
    states = {d["device"]: d["models"]["iris"]["deployment"]["state"] for d in doc["devices"]}
    assert states == {inside[0]: "active", inside[1]: "rolled_back",
                      outside[0]: "not_in_rollout", inside[2]: "offline"}  # fmt: skip


def test_a_device_desired_state_wins_and_a_desired_model_not_installed_is_a_row(
    broker: Broker, client: mqtt.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(client, "edge/fleets/north/models/iris/desired", fleet_manifest("1.4.0", 12),
            retain=True)  # fmt: skip
    pinned = {**fleet_manifest("1.2.0", 13), "rollout": None}
    del pinned["rollout"]
    publish(client, "edge/devices/pi-1/models/iris/desired", pinned, retain=True)
    publish(client, "edge/fleets/north/models/wine/desired",
            {**fleet_manifest("2.0.0", 4), "name": "wine"}, retain=True)  # fmt: skip
    publish(client, "edge/devices/pi-1/status",
            status_payload("pi-1", "north", models=iris("1.2.0")), retain=True)  # fmt: skip
    code, out, err = run_status(capsys, "--json", "--wait", "0.3", *broker_args(broker))
    assert code == 0, err
    models = json.loads(out)["devices"][0]["models"]
    assert models["iris"]["desired"] == {"version": "1.2.0", "serial": 13, "source": "device"}
    assert models["iris"]["deployment"]["state"] == "active"
    assert models["wine"]["version"] is None  # desired, not installed yet
    assert models["wine"]["desired"]["version"] == "2.0.0"
    assert models["wine"]["deployment"]["state"] == "updating"


def test_an_enrolled_device_that_never_connected_is_listed(
    broker: Broker, client: mqtt.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    record = {"device": "pi-9", "fleet": "north", "tags": {"site": "dock"},
              "enrolled_at": "2026-05-01T12:00:00.000Z"}  # fmt: skip
    publish(client, "edge/devices/pi-9/enrolment", record, retain=True)
    _, out, _ = run_status(capsys, "--json", "--fleet", "north", "--wait", "0.3",
                              *broker_args(broker))  # fmt: skip
    (pi9,) = json.loads(out)["devices"]
    assert (pi9["device"], pi9["fleet"], pi9["state"]) == ("pi-9", "north", "unknown")
    assert pi9["tags"] == {"site": "dock"} and pi9["enrolled_at"] == record["enrolled_at"]
    code, out, _ = run_status(capsys, "--wait", "0.3", *broker_args(broker))
    assert code == 0
    assert "    enrolled, no status yet" in out.splitlines()


def test_long_names_and_reasons_stay_within_80_columns(
    broker: Broker, client: mqtt.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(client, "edge/fleets/warehouse-north/models/iris/desired", fleet_manifest("1.3.0", 9),
            retain=True)  # fmt: skip
    for i in range(3):
        name = f"warehouse-north-raspberry-{i:03d}"
        publish(client, f"edge/devices/{name}/status",
                status_payload(name, "warehouse-north" if i else "south",
                               models=iris("1.2.0", reason=REFUSED + " and more" * 30)),
                retain=True)  # fmt: skip
    code, out, _ = run_status(capsys, "--wait", "0.3", *broker_args(broker))
    assert code == 0
    lines = out.splitlines()
    assert "FLEET" in lines[0]  # two fleets: the column is back
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    # Three lines of reason at most under each rejected row (the south device has nothing
    # desired: it is active, and an active row has no reason line).
    assert sum(1 for line in lines if line.startswith("    ")) == 6
    assert sum(1 for line in lines if line.startswith("    ") and line.endswith(" …")) == 2


def test_a_fleet_name_with_a_wildcard_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_status(capsys, "--fleet", "north/+")
    assert exc.value.code == 2
