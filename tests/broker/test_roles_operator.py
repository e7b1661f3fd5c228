"""Operator and viewer accounts: exactly what edge-fleet's commands need, no ``readwrite #``."""

from __future__ import annotations

import json

from fleet.accounts import role_account
from fleet.retained import Session
from tests.broker.test_acl import publish_reason
from tests.broker.test_roles import retain_all, until_marker
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker, Creds

# What edge-fleet publishes: desired state and its history (fleet and device), artifact
# chunks, rollout plans, enrolment records, commands, the clearing of a forgotten
# device's retained status, and the barrier message of a retained read.
OPERATOR_WRITES = [
    "edge/fleets/f1/models/m/desired",
    "edge/fleets/f1/models/m/history",
    "edge/fleets/f1/models/m/rollout",
    "edge/devices/dev-1/models/m/desired",
    "edge/devices/dev-1/models/m/history",
    "edge/artifacts/abc/0",
    "edge/devices/dev-1/enrolment",
    "edge/devices/dev-1/status",
    "edge/devices/dev-1/commands/rollback",
    "edge/fleet-tools/abc/barrier",
]
# What only devices or collectors write: results, acks, health, events, answers; the
# operator's own name as a device; anything else.
OPERATOR_MUST_NOT_WRITE = [
    "edge/devices/dev-1/results",
    "edge/devices/dev-1/results/ack",
    "edge/devices/dev-1/health",
    "edge/devices/dev-1/events",
    "edge/devices/dev-1/responses/r1",
    "edge/devices/operator/status",  # its own name (the fixture's operator account)
    "edge/devices/operator/health",
    "edge/fleets/f1/other",
    "other/topic",
]
# Retained state every read-only tool sees.
VIEWED = [
    "edge/devices/dev-1/status",
    "edge/devices/dev-1/enrolment",
    "edge/fleets/f1/models/m/desired",
    "edge/fleets/f1/models/m/history",
    "edge/fleets/f1/models/m/rollout",
    "edge/devices/dev-1/models/m/desired",
    "edge/devices/dev-1/models/m/history",
]
NOT_VIEWED = [
    "edge/artifacts/abc/0",
    "edge/devices/dev-1/commands/rollback",
    "edge/devices/dev-1/results/ack",
]


def refusals(broker: Broker, creds: Creds, topics: list[str]) -> dict[str, int]:
    """PUBACK reason per topic; 16 (no matching subscribers) is a success, as 0 is."""
    client = broker.client(creds)
    return {t: 0 if (rc := publish_reason(client, t)) == 16 else rc for t in topics}


def test_operator_publishes_what_edge_fleet_publishes(broker: Broker) -> None:
    got = refusals(broker, broker.operator, OPERATOR_WRITES)
    assert got == dict.fromkeys(OPERATOR_WRITES, 0)


def test_operator_cannot_publish_results_acks_or_device_reports(broker: Broker) -> None:
    broker.add_device("dev-1", fleet="f1")
    seen = broker.subscribe("#")
    got = refusals(broker, broker.operator, OPERATOR_MUST_NOT_WRITE)
    assert got == dict.fromkeys(OPERATOR_MUST_NOT_WRITE, 135)
    broker.client().publish("edge/devices/dev-1/events", b"marker", qos=1).wait_for_publish(5)
    assert until_marker(seen) == ["edge/devices/dev-1/events"]  # none got through


def test_operator_reads_device_reports_and_fleet_state_but_no_results(broker: Broker) -> None:
    retain_all(broker, [*VIEWED, "edge/artifacts/abc/0"])
    seen = broker.subscribe("edge/#", broker.operator)
    harness = broker.client()
    live = ["edge/devices/dev-1/health", "edge/devices/dev-1/events",
            "edge/devices/dev-1/responses/r1"]  # fmt: skip
    for topic in ["edge/devices/dev-1/results", "edge/devices/dev-1/results/ack",
                  "edge/devices/dev-1/commands/rollback", *live]:  # fmt: skip
        harness.publish(topic, b"x", qos=1).wait_for_publish(5)
    harness.publish("edge/devices/dev-2/events", b"marker", qos=1).wait_for_publish(5)
    assert until_marker(seen) == sorted(
        [*VIEWED, "edge/artifacts/abc/0", *live, "edge/devices/dev-2/events"]
    )


def test_operator_reads_retained_state_and_forgets_a_device(broker: Broker) -> None:
    """The barrier read edge-fleet uses, then clearing a device's retained topics."""
    retain_all(broker, VIEWED)
    session = Session(operator(broker), "test")
    try:
        got = session.read_retained(["edge/devices/dev-1/#", "edge/fleets/#"])
        assert sorted(got) == sorted(VIEWED)
        forget = [t for t in VIEWED if t.startswith("edge/devices/dev-1/")]
        session.wait([session.publish(t, b"") for t in forget], "forget dev-1")
        assert sorted(session.read_retained(["edge/#"])) == sorted(set(VIEWED) - set(forget))
    finally:
        session.close()


def test_viewer_reads_fleet_state_enrolments_and_rollouts(broker: Broker) -> None:
    viewer = broker.add_viewer("grafana")
    retain_all(broker, [*VIEWED, *NOT_VIEWED])
    seen = broker.subscribe("edge/#", viewer)
    harness = broker.client()
    for topic in ["edge/devices/dev-1/results", "edge/devices/dev-1/responses/r1",
                  "edge/devices/dev-1/health"]:  # fmt: skip
        harness.publish(topic, b"x", qos=1).wait_for_publish(5)
    harness.publish("edge/devices/dev-2/events", b"marker", qos=1).wait_for_publish(5)
    assert until_marker(seen) == sorted(
        [*VIEWED, "edge/devices/dev-1/health", "edge/devices/dev-2/events"]
    )


def test_viewer_writes_nothing_but_its_own_barrier(broker: Broker) -> None:
    viewer = broker.add_viewer("grafana")
    topics = [*OPERATOR_WRITES, *OPERATOR_MUST_NOT_WRITE, "edge/fleet-tools/ops/barrier"]
    assert refusals(broker, viewer, topics) == dict.fromkeys(topics, 135)
    # Its own corner of fleet-tools/, for the barrier of a read-only retained read.
    mine = broker.subscribe("edge/fleet-tools/grafana/#", viewer)
    assert refusals(broker, viewer, ["edge/fleet-tools/grafana/b"]) == {
        "edge/fleet-tools/grafana/b": 0
    }
    mine.wait_for(lambda m: len(m) == 1)


def test_reader_is_the_viewer_under_its_older_name(broker: Broker) -> None:
    broker.add_reader("exporter")
    acl = (broker.conf_dir / "acl").read_text()
    block = role_account("viewer", "exporter", "edge").block()
    assert f"\n{block}\n" in acl


def test_no_account_of_any_role_can_write_everything(broker: Broker) -> None:
    for role in ("operator", "collector", "viewer"):
        assert "topic readwrite #" not in role_account(role, "x", "edge").acl
    broker.add_collector("coll-1")
    broker.add_viewer("grafana")
    blocks = (broker.conf_dir / "acl").read_text().split("\n\n")
    wide = [b.split("\n", 1)[0] for b in blocks if "readwrite #" in b]
    assert wide == ["user harness"]  # the tests' own stand-in, made by no script


def test_operator_commands_reach_the_device_and_answers_come_back(broker: Broker) -> None:
    device = broker.add_device("dev-1", fleet="f1")
    commands = broker.subscribe("edge/devices/dev-1/commands/+", device)
    answers = broker.subscribe("edge/devices/dev-1/responses/#", broker.operator)
    op = broker.client(broker.operator)
    assert publish_reason(op, "edge/devices/dev-1/commands/rollback", b"{}") == 0
    commands.wait_for(lambda m: len(m) == 1)
    answer = json.dumps({"ok": True}).encode()
    assert publish_reason(broker.client(device), "edge/devices/dev-1/responses/r1", answer) == 0
    assert [m.payload for m in answers.wait_for(lambda m: len(m) == 1)] == [answer]
