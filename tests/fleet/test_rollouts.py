"""``edge-fleet rollout``: deciding on plain values, and the plan on a real mosquitto.

The devices here are retained statuses written as agents write them, so a turn of the
driver can be judged in a second; tests/fleet/test_rollouts_e2e.py runs real agents.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.wire import rollouts
from agent.wire.payloads import InvalidPayload
from agent.wire.times import rfc3339
from agent.wire.topics import rollout_bucket
from fleet import rollout_driver as driver
from fleet.cli import main
from fleet.progress import Summary
from fleet.publish import publish
from fleet.retained import Session
from fleet.rollout_driver import Acts, Decision, claim, decide, moved, read_view
from fleet.rollout_plans import follow
from fleet.rollouts import parse_duration, parse_steps
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, desired, retain_status, retained

PLAN = "edge/fleets/f1/models/iris/rollout"
T0 = 1_800_000_000.0


def a_plan(**over: Any) -> dict[str, Any]:
    plan = rollouts.plan(
        fleet="f1", model="iris", version="1.1.0", sha256="ab" * 32, steps=[10, 50, 100],
        every_s=60, halt_if="rejected>2% or rolled_back>1%", t=T0,
    )  # fmt: skip
    plan.update(over)
    return plan


def counts(total: int, **n: int) -> Summary:
    return Summary(total=total, counts=n, versions=("1.1.0",))


# --- deciding ---------------------------------------------------------------------------


def test_a_step_waits_out_its_time_then_widens() -> None:
    plan = a_plan()
    wait = decide(plan, counts(4, active=4), T0 + 30)
    assert wait.kind == "wait" and wait.reason.startswith("step 1/3 (10%): next in 30 s")
    go = decide(plan, counts(4, active=4), T0 + 60)
    assert go == Decision("advance", "step 1/3 (10%) held (4/4 on 1.1.0); widening to 50%")
    after = moved(plan, go, T0 + 60)
    assert (after["step"], after["percent"], after["state"]) == (1, 50, "running")
    assert after["step_started_at"] == rfc3339(T0 + 60) and plan["step"] == 0


def test_the_halt_condition_trips_at_once_naming_the_figures() -> None:
    halt = decide(a_plan(), counts(40, active=37, rejected=3), T0 + 1)
    assert halt == Decision("halt", "halted at step 1/3 (10%): rejected 3/40 = 7.5% > 2%")
    after = moved(a_plan(rollback_on_halt=True), halt, T0 + 1)
    assert after["state"] == "halted" and after["rollback_pending"] is True
    assert "rollback_pending" not in moved(a_plan(), halt, T0 + 1)


def test_promote_must_hold_too() -> None:
    plan = a_plan(promote_if="active>=95%")
    wait = decide(plan, counts(40, active=30, updating=10), T0 + 61)
    assert wait.kind == "wait"
    assert wait.reason == "step 1/3 (10%): waiting for active>=95%: active 30/40 = 75% < 95%"
    assert decide(plan, counts(40, active=39, updating=1), T0 + 61).kind == "advance"


def test_no_device_in_the_step_waits_the_time_only() -> None:
    plan = a_plan(promote_if="active>=95%")
    assert decide(plan, counts(0), T0 + 1).kind == "wait"
    go = decide(plan, counts(0), T0 + 60)
    assert go.kind == "advance" and "no device in it yet" in go.reason


def test_done_once_the_last_step_has_held() -> None:
    last = a_plan(step=2, percent=100)
    assert decide(last, counts(4, active=4), T0 + 10).kind == "wait"
    done = decide(last, counts(4, active=4), T0 + 60)
    assert done == Decision("done", "done at step 3/3 (100%): 4/4 on 1.1.0")
    assert moved(last, done, T0 + 60)["state"] == "done"


# --- the plan payload and the arguments ----------------------------------------------------


def test_the_plan_payload_is_checked_field_by_field() -> None:
    plan = a_plan()
    assert rollouts.check_plan(json.loads(json.dumps(plan)), "p") == plan
    assert plan["steps"] == [10, 50, 100] and plan["promote_if"] is None
    for change, named in [
        ({"steps": [10, 10]}, "steps"), ({"steps": [0, 50]}, "steps"),
        ({"step": 3}, "step"), ({"percent": 20}, "percent: 20 is not steps[0] = 10"),
        ({"state": "paused"}, "state"), ({"updated_at": "yesterday"}, "updated_at"),
        ({"where": {"ring": "a b"}}, "where"), ({"schema": 2}, "schema"),
        ({"revision": 0}, "revision"), ({"rollback_on_halt": "yes"}, "rollback_on_halt"),
    ]:  # fmt: skip
        with pytest.raises(InvalidPayload, match=re.escape(f"p: {named}")):
            rollouts.check_plan({**plan, **change}, "p")


def test_steps_and_durations() -> None:
    assert parse_steps("1,10,50,100") == [1, 10, 50, 100]
    assert parse_steps("0.5, 5%,100") == [0.5, 5, 100]
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration("2s") == 2 and parse_duration("90") == 90


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["iris", "--fleet", "f1", "--steps", "1,x", "--every", "1m", "--halt-if", "rejected>1"],
         "--steps: 'x' is not a percent"),
        (["iris", "--fleet", "f1", "--steps", "50,10", "--every", "1m", "--halt-if", "rejected>1"],
         "--steps: 10 after 50; steps must increase"),
        (["iris", "--fleet", "f1", "--steps", "1,10", "--every", "soon", "--halt-if", "rejected>1"],
         "--every: 'soon' is not a duration"),
        (["iris", "--fleet", "f1", "--steps", "1,10", "--every", "1m", "--halt-if", "rejcted>1"],
         "--halt-if: unknown metric 'rejcted'"),
        (["iris", "--fleet", "f1", "--steps", "1,10", "--every", "1m", "--halt-if", "rejected>1",
          "--promote-if", "active>="], "--promote-if: after active>=: unexpected the end"),
        (["iris", "--fleet", "f1", "--steps", "1,10"], "--steps: give --every and --halt-if"),
        (["iris", "--fleet", "f1", "--every", "1m"], "--every: needs --steps"),
        (["iris", "--fleet", "f1", "--abort", "--halt-if", "rejected>1"], "--halt-if: only when"),
        (["iris", "--steps", "1"], "--fleet: needed with MODEL"),
        (["--steps", "1"], "MODEL: needed, except for `edge-fleet rollout --follow` alone"),
        (["iris", "--fleet", "f1", "--abort", "--follow"], "--follow: not with --abort"),
    ],
)  # fmt: skip
def test_usage_mistakes_exit_2_naming_the_flag(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rollout", *args, "--signing-key", "/nonexistent"]) == 2
    assert message in capsys.readouterr().err


# --- on a real broker ------------------------------------------------------------------------


def published(broker: Broker, keypair: Keypair, *packages: Path, percent: float = 0) -> None:
    ops = operator(broker)
    for i, package in enumerate(packages):
        publish(ops, package, fleet="f1", key=keypair.key,
                percent=percent if i == len(packages) - 1 else 100)  # fmt: skip


def plan_on(broker: Broker) -> dict[str, Any]:
    return dict(json.loads(retained(broker, PLAN)[PLAN]))


START = ("--steps", "10,50,100", "--every", "1h", "--halt-if", "rejected>2% or rolled_back>1%")


def test_creating_a_plan_signs_its_first_step(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 1
    assert "nothing is published for fleet f1" in capsys.readouterr().err
    published(broker, keypair, iris_package, iris_package_v2)
    capsys.readouterr()
    args = cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START, "--where",
               "ring=canary", "--promote-if", "active >= 95%", "--json")  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = plan_on(broker)
    assert printed == plan and plan["revision"] == 1
    assert (plan["version"], plan["state"], plan["step"], plan["percent"]) == (
        "1.1.0", "running", 0, 10)  # fmt: skip
    assert plan["promote_if"] == "active>=95%" and plan["previous_version"] == "1.0.0"
    assert plan["where"] == {"ring": "canary"} and plan["every_s"] == 3600
    body = desired(broker)
    assert body["version"] == "1.1.0" and body["rollout"]["percent"] == 10
    assert body["rollout"]["where"] == {"ring": "canary"}
    # One plan at a time: a second one is refused while the first runs.
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 1
    assert "a rollout of 1.1.0 is running on fleet f1 (step 1/3 (10%))" in capsys.readouterr().err
    # The plain view says where it stands.
    assert main(cli(broker, None, "rollout", "iris", "--fleet", "f1")) == 0
    out = capsys.readouterr().out
    assert out.startswith("iris 1.1.0 on fleet f1: running at step 1/3 (10%)")
    assert "halt if rejected>2% or rolled_back>1%; promote if active>=95%" in out


def test_a_percent_by_hand_aborts_the_running_plan_saying_so(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    published(broker, keypair, iris_package, iris_package_v2)
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 0
    capsys.readouterr()
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "30")) == 0
    err = capsys.readouterr().err
    assert "aborted the running rollout of 1.1.0 on fleet f1 (it was at step 1/3 (10%))" in err
    assert plan_on(broker)["state"] == "aborted"
    assert plan_on(broker)["reason"] == "aborted (--percent 30 set by hand) at step 1/3 (10%)"
    assert desired(broker)["rollout"]["percent"] == 30
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--abort")) == 1
    assert "no running rollout on fleet f1 (plan: aborted)" in capsys.readouterr().err


def test_a_new_publish_supersedes_the_running_plan(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
) -> None:  # fmt: skip
    published(broker, keypair, iris_package, iris_package_v2)
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 0
    published(broker, keypair, iris_package)  # someone publishes 1.0.0 at 100% by hand
    plan = follow(operator(broker), keypair.key, who="t", only=("f1", "iris"), poll=0.2)
    assert plan is not None and plan["state"] == "aborted"
    assert plan["reason"] == "superseded: fleet f1 now desires 1.0.0, not this artifact"


def test_a_turn_halts_on_the_retained_status_of_the_devices(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
) -> None:  # fmt: skip
    published(broker, keypair, iris_package, iris_package_v2)
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--steps", "50,100",
                    "--every", "1h", "--halt-if", "rejected>=2")) == 0  # fmt: skip
    inside = [n for n in (f"d{i}" for i in range(100)) if rollout_bucket("f1/iris", n) < 50]
    refused = {"version": "1.0.0", "state": "rejected", "reason": "parity: row 2",
               "desired": {"version": "1.1.0", "serial": 3, "source": "fleet",
                           "decision": "rejected"}}  # fmt: skip
    retain_status(broker, inside[0], "f1", models={"iris": refused})
    retain_status(broker, inside[1], "f1", models={"iris": {"version": "1.1.0", "state": "active"}})
    s = Session(operator(broker), "test")
    try:
        view = read_view(s)
        plan, decision = driver.turn(s, PLAN, view.plans[PLAN], view, Acts(None, keypair.key),
                                     driver="t", say=print, settle=0.1)  # fmt: skip
        assert decision is not None and decision.kind == "wait"
        assert "1/2 on 1.1.0, 1 rejected" in decision.reason
        retain_status(broker, inside[2], "f1", models={"iris": refused})
        view = read_view(s)
        plan, decision = driver.turn(s, PLAN, plan, view, Acts(None, keypair.key),
                                     driver="t", say=print, settle=0.1)  # fmt: skip
    finally:
        s.close()
    assert decision == Decision("halt", "halted at step 1/2 (50%): rejected 2 >= 2")
    assert plan_on(broker)["state"] == "halted" and plan_on(broker)["driver"] == "t"


def test_a_follower_that_died_before_re_signing_is_made_good(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    published(broker, keypair, iris_package, iris_package_v2)
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 0
    s = Session(operator(broker), "test")
    try:
        # The plan says 50%, the desired state still 10%: what a kill -9 in between leaves.
        plan = {**plan_on(broker), "step": 1, "percent": 50}
        claim(s, PLAN, plan, driver="dead", settle=0)
        view = read_view(s)
        acts = Acts(operator(broker), keypair.key)
        driver.turn(s, PLAN, view.plans[PLAN], view, acts, driver="t", say=print, settle=0.1)
        assert desired(broker)["rollout"]["percent"] == 10  # its writer may still be at it
        monkeypatch.setattr(driver, "RECONCILE_AFTER_S", 0.0)
        driver.turn(s, PLAN, view.plans[PLAN], view, acts, driver="t", say=print, settle=0.1)
    finally:
        s.close()
    assert desired(broker)["rollout"]["percent"] == 50


def test_of_two_claims_on_one_revision_exactly_one_wins(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
) -> None:  # fmt: skip
    published(broker, keypair, iris_package, iris_package_v2)
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 0
    base = plan_on(broker)
    won: dict[str, Any] = {}
    sessions = {who: Session(operator(broker), who) for who in ("a", "b")}

    def try_claim(who: str) -> None:
        won[who] = claim(sessions[who], PLAN, {**base, "reason": who}, driver=who, settle=1.0)

    try:
        threads = [threading.Thread(target=try_claim, args=(w,)) for w in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in sessions.values():
            s.close()
    winners = [w for w, plan in won.items() if plan is not None]
    assert len(winners) == 1, won
    assert plan_on(broker)["driver"] == winners[0] and plan_on(broker)["revision"] == 2


def test_a_hand_written_plan_with_a_bad_condition_halts_saying_why(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
) -> None:  # fmt: skip
    published(broker, keypair, iris_package, iris_package_v2)
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", *START)) == 0
    s = Session(operator(broker), "test")
    try:
        claim(s, PLAN, {**plan_on(broker), "halt_if": "rejected>>1"}, driver="hand", settle=0)
        view = read_view(s)
        plan, _ = driver.turn(s, PLAN, view.plans[PLAN], view, Acts(None, keypair.key),
                              driver="t", say=print, settle=0.1)  # fmt: skip
    finally:
        s.close()
    assert plan["state"] == "halted"
    assert "cannot judge the step: halt_if: after rejected>: unexpected '>'" in plan["reason"]
