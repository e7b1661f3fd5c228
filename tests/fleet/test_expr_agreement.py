"""``agreement>=0.97 over 1000``: a promote condition over the shadow figures the
targeted devices retain in their status (fleet/expr.py, fleet/progress.py)."""

from __future__ import annotations

import pytest

from agent.wire.errors import UsageError
from fleet.expr import Agreement, parse
from fleet.progress import classify, summarize
from fleet.state import DeviceState


def device(name: str, compared: int, agreed: int, shadow_version: str = "1.1.0") -> DeviceState:
    d = DeviceState(name)
    d.status = {"state": "online", "models": {"region": {
        "version": "1.0.0", "state": "active",
        "shadow": {"version": shadow_version, "compared": compared, "agreed": agreed},
    }}}  # fmt: skip
    return d


SHADOW = {"fleet": {"name": "region", "version": "1.1.0", "serial": 2, "shadow": True}}


def test_agreement_is_weighed_over_every_targeted_device_and_needs_its_rows() -> None:
    rows = [classify("region", device("a", 600, 590), SHADOW),
            classify("region", device("b", 300, 290), SHADOW)]  # fmt: skip
    assert rows[0].state == "updating" and "in shadow beside 1.0.0 (600 rows" in rows[0].reason
    s = summarize(rows)
    assert (s.shadow_compared, s.shadow_agreed) == (900, 880)
    v = parse("agreement>=0.97 over 900").evaluate(s)
    assert v.holds and v.why == "agreement 880/900 = 0.9778 >= 0.97 over 900"
    v = parse("agreement >= 98% over 900").evaluate(s)
    assert not v.holds and v.why == "agreement 880/900 = 0.9778 < 0.98 over 900"
    v = parse("agreement>=0.5 over 1000").evaluate(s)
    assert not v.holds and v.why == "agreement over 900 compared rows, 1000 needed"
    assert str(parse("agreement>=97% over 1000")) == "agreement>=0.97 over 1000"
    assert isinstance(parse("agreement<0.9 over 10 or rejected>0").parts[0], Agreement)  # type: ignore[union-attr]


def test_figures_of_another_candidate_or_a_plain_rollout_do_not_count() -> None:
    stale = classify("region", device("a", 600, 600, shadow_version="0.9.0"), SHADOW)
    plain = classify(
        "region", device("b", 600, 600), {"fleet": {**SHADOW["fleet"], "shadow": False}}
    )
    assert stale.shadow_compared == 0 and plain.shadow_compared == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("agreement>=0.97", "expected 'over ROWS'"),
        ("agreement>=0.97 over", "after over: unexpected the end"),
        ("agreement>=0.97 over 5%", "a whole number of rows"),
        ("agreement>=1.5 over 10", "an agreement outside 0..1"),
        ("agreement over 10", "after agreement: unexpected 'over'"),
        ("agreemnt>=0.9 over 10", "unknown metric 'agreemnt'"),
    ],
)
def test_a_bad_agreement_condition_names_the_token(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse(text, "--promote-if")
