"""fleet/expr.py: halt and promote conditions over a rollout step's counts."""

from __future__ import annotations

import pytest

from agent.wire.errors import UsageError
from fleet.expr import Compare, Junction, parse
from fleet.progress import Summary


def summary(total: int, **counts: int) -> Summary:
    return Summary(total=total, counts=counts, versions=("1.4.0",))


def test_a_share_and_a_count() -> None:
    s = summary(40, rejected=3)
    v = parse("rejected>2%").evaluate(s)
    assert v.holds and v.why == "rejected 3/40 = 7.5% > 2%"
    v = parse("rejected > 5").evaluate(s)
    assert not v.holds and v.why == "rejected 3 <= 5"
    assert parse("rejected>=3").evaluate(s).holds
    assert parse("rejected==3").evaluate(s).holds
    assert parse("rejected<3").evaluate(s).holds is False
    assert parse("rejected<=7.5%").evaluate(s).holds


def test_and_binds_tighter_than_or() -> None:
    e = parse("rejected>2% or rolled_back>1 and offline>0")
    assert isinstance(e, Junction) and e.word == "or"
    assert isinstance(e.parts[1], Junction) and e.parts[1].word == "and"
    # rejected holds alone: the "or" holds, whatever the "and" says.
    assert e.evaluate(summary(10, rejected=1)).holds
    assert not e.evaluate(summary(10, rolled_back=2)).holds
    assert e.evaluate(summary(10, rolled_back=2, offline=1)).holds
    grouped = parse("(rejected>2% or rolled_back>1) and offline>0")
    assert not grouped.evaluate(summary(10, rejected=1)).holds
    assert str(grouped) == "(rejected>2% or rolled_back>1) and offline>0"


def test_the_reason_names_what_decided() -> None:
    e = parse("rejected>2% or rolled_back>1%")
    assert e.evaluate(summary(40, rejected=3)).why == "rejected 3/40 = 7.5% > 2%"
    both = e.evaluate(summary(40, rejected=3, rolled_back=1))
    assert both.why == "rejected 3/40 = 7.5% > 2% or rolled_back 1/40 = 2.5% > 1%"
    calm = e.evaluate(summary(40))
    assert not calm.holds
    assert calm.why == "rejected 0/40 = 0% <= 2% or rolled_back 0/40 = 0% <= 1%"
    waiting = parse("active>=95% and probation==0").evaluate(summary(40, active=30))
    assert waiting.why == "active 30/40 = 75% < 95%"


def test_no_devices_is_a_zero_share() -> None:
    assert not parse("rejected>0%").evaluate(summary(0)).holds


def test_words_are_case_insensitive_and_spacing_free() -> None:
    assert parse("Rejected>2% OR rolled_back>1%") == parse(" rejected > 2 %or rolled_back>1% ")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("rejcted>2%", "unknown metric 'rejcted' at column 1"),
        ("rejected>>2", "after rejected>: unexpected '>' at column 10"),
        ("rejected 2%", "after rejected: unexpected '2%' at column 10"),
        ("rejected>", "after rejected>: unexpected the end"),
        ("rejected>2% or", "unexpected the end"),
        ("rejected>2% rolled_back>1%", "unexpected 'rolled_back' at column 13"),
        ("rejected=2", "unexpected '=' at column 9"),
        ("rejected>150%", "a share over 100%: '150%'"),
        ("(rejected>2%", "unclosed '(': the end"),
        ("rejected>2% and and", "unexpected 'and' at column 17"),
        ("rejected>x", "unexpected 'x'"),
        ("rejected>2$", "unexpected '$' at column 11"),
        ("", "empty condition"),
    ],
)
def test_a_bad_expression_names_the_token(text: str, named: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(text, "--halt-if")
    assert str(e.value).startswith("--halt-if: ")
    assert named in str(e.value), str(e.value)
    assert e.value.exit_code == 2


def test_the_equal_sign_hint() -> None:
    with pytest.raises(UsageError, match="write == for equality"):
        parse("rejected=0")


def test_round_trip() -> None:
    e = parse("rejected>2% or rolled_back>1")
    assert str(e) == "rejected>2% or rolled_back>1"
    assert parse(str(e)) == e
    assert Compare("active", ">=", 95, True).evaluate(summary(20, active=19)).holds
