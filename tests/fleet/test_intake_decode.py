"""The collector decodes payloads through orjson when installed, with the standard
library's answers wherever orjson would differ."""

from __future__ import annotations

import math

import pytest

from agent.wire import payloads
from fleet import intake


@pytest.mark.parametrize(
    "raw",
    [
        b'{"device":"d","results":[{"seq":1,"inputs":[[1.5,2]],"outputs":{"prediction":["a"]}}]}',
        b'{"x":NaN,"y":Infinity}',  # what Python's json writes for NaN; orjson refuses it
        b'{"big":123456789012345678901234567890}',  # past 64 bits
        '{"s":"åäö 日本"}'.encode(),
    ],
)
def test_same_object_with_or_without_orjson(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = intake._decode(raw, "t")
    monkeypatch.setattr(intake, "orjson", None)
    plain = intake._decode(raw, "t")
    assert repr(fast) == repr(plain)  # repr: NaN != NaN, but prints the same
    if "x" in plain:
        assert math.isnan(plain["x"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"{not json", "t: not JSON"), (b"[1, 2]", "t: expected a JSON object, got list")],
)
def test_bad_payloads_are_named_the_same_way(raw: bytes, message: str) -> None:
    with pytest.raises(payloads.InvalidPayload) as e:
        intake._decode(raw, "t")
    assert str(e.value).startswith(message)
