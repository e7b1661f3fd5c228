"""fleet/progress.py on plain values: desired against actual, and the summary line."""

from __future__ import annotations

from typing import Any

from agent.wire.topics import rollout_bucket
from fleet import progress
from fleet.progress import DeviceProgress, classify, summarize, targeting
from fleet.state import DeviceState

SALT = "north/iris"


def manifest(version: str = "1.4.0", serial: int = 7, **rollout: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "iris", "version": version, "serial": serial}
    if rollout:
        body["rollout"] = {"salt": SALT, **rollout}
    return body


def device(
    name: str = "pi-001",
    *,
    online: bool = True,
    tags: dict[str, str] | None = None,
    gone: str | None = None,
    **model: Any,
) -> DeviceState:
    status: dict[str, Any] = {
        "device": name,
        "fleet": "north",
        "state": "online" if online else "offline",
        "models": {"iris": model} if model else {},
    }
    if tags is not None:
        status["tags"] = tags
    if gone:
        status["reason"] = gone
    return DeviceState(name, status=status)


def devices_by_bucket(percent: float) -> tuple[str, str]:
    """A device id inside ``percent`` of SALT and one outside."""
    inside = outside = None
    for i in range(1000):
        name = f"pi-{i:03d}"
        if rollout_bucket(SALT, name) < percent:
            inside = inside or name
        else:
            outside = outside or name
        if inside and outside:
            return inside, outside
    raise AssertionError("no split")


def test_on_the_desired_version_is_active() -> None:
    row = classify("iris", device(version="1.4.0", state="active"), {"fleet": manifest()})
    assert (row.state, row.targeted, row.source, row.on_desired) == ("active", True, "fleet", True)
    assert row.desired_version == "1.4.0" and row.desired_serial == 7


def test_probation_is_on_the_version_but_still_on_trial() -> None:
    d = device(version="1.4.0", state="probation", reason="on probation for 60 s")
    row = classify("iris", d, {"fleet": manifest()})
    assert row.state == "probation" and "60 s" in row.reason


def test_the_devices_own_desired_state_wins() -> None:
    d = device(version="1.3.0", state="active")
    row = classify("iris", d, {"fleet": manifest("1.4.0"), "device": manifest("1.3.0", 9)})
    assert (row.state, row.source, row.desired_version) == ("active", "device", "1.3.0")


def test_a_device_manifest_has_no_rollout_gate() -> None:
    _, outside = devices_by_bucket(10)
    row = classify("iris", device(outside), {"device": manifest(percent=10)})
    assert row.targeted and row.state == "updating"


def test_outside_the_percent_is_not_in_rollout_with_the_bucket() -> None:
    inside, outside = devices_by_bucket(30)
    m = {"fleet": manifest(percent=30)}
    out = classify("iris", device(outside, version="1.3.0", state="active"), m)
    bucket = rollout_bucket(SALT, outside)
    assert out.state == "not_in_rollout" and not out.targeted
    assert out.reason == f"not in rollout (bucket {bucket} >= 30%)"
    assert classify("iris", device(inside, version="1.3.0", state="active"), m).targeted


def test_where_tags_must_all_match() -> None:
    m = {"fleet": manifest(percent=100, where={"ring": "canary", "site": "north"})}
    stable = device(tags={"ring": "stable", "site": "north"}, version="1.3.0", state="active")
    row = classify("iris", stable, m)
    assert row.state == "not_in_rollout"
    assert row.reason == "not in rollout (tag ring=canary wanted, device has ring=stable)"
    untagged = classify("iris", device(version="1.3.0", state="active"), m)
    assert untagged.reason == "not in rollout (tag ring=canary wanted, device has no tag ring)"
    canary = device(tags={"ring": "canary", "site": "north"}, version="1.3.0", state="active")
    assert classify("iris", canary, m).state == "updating"


def test_outside_the_rollout_but_already_on_it_counts_as_on_it() -> None:
    # Narrowed 50% -> 10%: devices that took it keep it.
    _, outside = devices_by_bucket(10)
    row = classify("iris", device(outside, version="1.4.0"), {"fleet": manifest(percent=10)})
    assert row.state == "active" and not row.targeted


def test_targeted_not_there_yet_is_updating_with_the_devices_reason() -> None:
    d = device(version="1.3.0", state="downloading", reason="downloading 1.4.0")
    row = classify("iris", d, {"fleet": manifest()})
    assert (row.state, row.reason) == ("updating", "downloading 1.4.0")
    fresh = classify("iris", device(version="1.3.0", state="active"), {"fleet": manifest()})
    assert (fresh.state, fresh.reason) == ("updating", "on 1.3.0, 1.4.0 desired")
    empty = classify("iris", device(), {"fleet": manifest()})
    assert (empty.state, empty.reason, empty.version) == (
        "updating", "nothing installed, 1.4.0 desired", None,
    )  # fmt: skip


def test_rejected_from_the_devices_decision() -> None:
    d = device(
        version="1.3.0", state="rejected", reason="signature: unknown key 4f2a",
        desired={"version": "1.4.0", "serial": 7, "source": "fleet", "decision": "rejected"},
    )  # fmt: skip
    row = classify("iris", d, {"fleet": manifest()})
    assert (row.state, row.reason) == ("rejected", "signature: unknown key 4f2a")


def test_rejected_as_an_older_agent_reports_it() -> None:
    # Before issue 13 a refusal left the state "active" with the reason alone.
    d = device(version="1.3.0", state="active", reason="delivery of 1.4.0 refused: parity")
    assert classify("iris", d, {"fleet": manifest()}).state == "rejected"


def test_a_rejection_of_another_version_says_nothing_about_this_one() -> None:
    d = device(
        version="1.3.0", state="rejected", reason="parity",
        desired={"version": "1.3.5", "serial": 5, "decision": "rejected"},
    )  # fmt: skip
    assert classify("iris", d, {"fleet": manifest()}).state == "updating"


def test_rolled_back_by_probation() -> None:
    d = device(version="1.3.0", state="rolled_back", reason="probation of 1.4.0: errors 30%")
    row = classify("iris", d, {"fleet": manifest()})
    assert (row.state, row.reason) == ("rolled_back", "probation of 1.4.0: errors 30%")


def test_the_devices_not_in_rollout_is_stale_after_a_widening() -> None:
    said = {"version": "1.4.0", "serial": 6, "decision": "not_in_rollout"}
    d = device(version="1.3.0", state="not_in_rollout", reason="not in rollout", desired=said)
    assert classify("iris", d, {"fleet": manifest(serial=7)}).state == "updating"
    assert classify("iris", d, {"fleet": manifest(serial=6)}).state == "not_in_rollout"


def test_offline_keeps_what_it_last_said() -> None:
    d = device(online=False, gone="connection lost", version="1.3.0", state="active")
    row = classify("iris", d, {"fleet": manifest()})
    assert row.state == "offline" and row.targeted
    assert row.reason == "connection lost (last seen updating on 1.3.0)"


def test_unknown_without_status_or_desired_state() -> None:
    assert classify("iris", DeviceState("pi-9"), {"fleet": manifest()}).state == "unknown"
    row = classify("iris", device(version="1.3.0"), {})
    assert (row.state, row.reason) == ("unknown", "no desired state published")


def test_tolerates_odd_fields() -> None:
    d = DeviceState("pi-1", status={"state": "online", "models": {"iris": "x"}, "tags": 3})
    assert classify("iris", d, {"fleet": manifest()}).state == "updating"
    odd = manifest(percent="all")
    assert targeting(odd, "pi-1", {}) is None


def rows(**counts: int) -> list[DeviceProgress]:
    out = []
    for state, n in counts.items():
        for i in range(n):
            out.append(DeviceProgress(f"{state}-{i}", "iris", state, desired_version="1.4.0"))
    return out


def test_summary_line() -> None:
    s = summarize(rows(active=148, probation=2, rejected=3, rolled_back=2, not_in_rollout=45))
    assert s.line() == (
        "150/200 on 1.4.0 (2 on probation), 3 rejected, 2 rolled back, 45 not in rollout"
    )
    assert s.total == 200 and s.count("rejected") == 3 and s.share("rejected") == 1.5
    assert s.as_dict()["on_desired"] == 150 and s.as_dict()["offline"] == 0


def test_summary_of_nothing_and_of_mixed_versions() -> None:
    assert summarize([]).line() == "no devices" and summarize([]).share("active") == 0
    mixed = [*rows(active=1), DeviceProgress("d", "iris", "active", desired_version="1.3.0")]
    assert summarize(mixed).line() == "2/2 on their desired version"
    assert set(progress.STATES) >= {"active", "offline", "unknown"}
