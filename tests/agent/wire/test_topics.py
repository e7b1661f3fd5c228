"""Topic names and the rollout bucket the contract fixes."""

from __future__ import annotations

import hashlib

from agent.wire.topics import Topics, in_rollout, rollout_bucket


def test_topic_names_follow_the_contract() -> None:
    t = Topics()
    assert t.fleet_desired("f1", "iris") == "edge/fleets/f1/models/iris/desired"
    assert t.device_desired("d1", "iris") == "edge/devices/d1/models/iris/desired"
    assert t.artifact_chunk("ab", 3) == "edge/artifacts/ab/3"
    assert t.status("d1") == "edge/devices/d1/status"
    assert t.results("d1") == "edge/devices/d1/results"
    assert t.command("d1", "rollback") == "edge/devices/d1/commands/rollback"
    assert t.device_of("edge/devices/d1/health") == "d1"
    assert t.device_of("edge/fleets/f/models/m/desired") is None


def test_rollout_bucket_is_the_contract_formula() -> None:
    expected = int(hashlib.sha256(b"salt-1dev-7").hexdigest(), 16) % 100
    assert rollout_bucket("salt-1", "dev-7") == expected
    ids = [f"dev-{i}" for i in range(2000)]
    share = sum(in_rollout("s", d, 10) for d in ids) / len(ids)
    assert 0.07 < share < 0.13
    assert not any(in_rollout("s", d, 0) for d in ids)
    assert all(in_rollout("s", d, 100) for d in ids)
