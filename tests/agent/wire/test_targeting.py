"""Device tags and the signed rollout block: one parser and one judgement for every side."""

from __future__ import annotations

from typing import Any

import pytest

from agent.wire.errors import ManifestInvalid
from agent.wire.targeting import Rollout, outside, parse_rollout, parse_tags
from agent.wire.topics import rollout_bucket


def test_tags_parse_from_the_env_form_and_repeated_options() -> None:
    assert parse_tags("site=north, ring=canary") == {"site": "north", "ring": "canary"}
    assert parse_tags("") == {}
    assert parse_tags("ring=canary,ring=canary") == {"ring": "canary"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("site", "tags: 'site' is not key=value"),
        ("site=no rth", "tags.site: 'no rth' is not a plain name"),
        (".hidden=x", "tags: key '.hidden' is not a plain name"),
        ("ring=a,ring=b", "tags: ring is given twice ('a' and 'b')"),
    ],
)
def test_a_bad_tag_names_the_item(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_tags(text)


def test_rollout_block_with_where() -> None:
    assert parse_rollout(None) is None
    got = parse_rollout({"percent": 50, "salt": "f/iris", "where": {"ring": "canary"}})
    assert got == Rollout(50.0, "f/iris", {"ring": "canary"})
    assert parse_rollout({"percent": 10}) == Rollout(10.0, "", {})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"where": ["ring=canary"]}, "rollout.where: expected a table"),
        ({"where": {"ring": 3}}, "rollout.where.ring: 3 is not a plain name"),
        ({"percent": -1}, "rollout.percent: expected 0..100"),
    ],
)
def test_a_malformed_rollout_names_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        parse_rollout(raw)


def test_every_where_tag_must_match_then_the_bucket_decides() -> None:
    canary = Rollout(100.0, "f/iris", {"ring": "canary", "site": "north"})
    assert outside(canary, "pi-1", {"ring": "canary", "site": "north", "x": "y"}) is None
    assert outside(canary, "pi-1", {"ring": "stable", "site": "north"}) == (
        "not in rollout (tag ring=canary wanted, device has ring=stable)"
    )
    assert outside(canary, "pi-1", {"ring": "canary"}) == (
        "not in rollout (tag site=north wanted, device has no site tag)"
    )
    half = Rollout(50.0, "f/iris", {"ring": "canary"})
    device = next(f"pi-{i}" for i in range(100) if rollout_bucket("f/iris", f"pi-{i}") >= 50)
    bucket = rollout_bucket("f/iris", device)
    assert outside(half, device, {"ring": "canary"}) == f"not in rollout (bucket {bucket} >= 50%)"
