"""Every payload is built and checked by agent.wire.payloads, on both sides."""

from __future__ import annotations

import json

import pytest

from agent.wire import payloads
from agent.wire.payloads import InvalidPayload
from agent.wire.times import parse_rfc3339, rfc3339


def test_one_time_format_everywhere() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1.2345) == "1970-01-01T00:00:01.234Z"
    for built in (
        payloads.status("d", "f", "online", {})["since"],
        payloads.health("d", "f", {})["time"],
        payloads.event("d", payloads.ACTIVATED, model="m")["time"],
    ):
        assert len(built) == len("1970-01-01T00:00:00.000Z") and built.endswith("Z")
        parse_rfc3339(built)


def test_built_payloads_pass_their_own_checks_after_the_wire() -> None:
    status = payloads.status("pi-1", "north", "online", {"iris": {"version": "1.0.0"}})
    health = payloads.health("pi-1", "north", {"uptime_s": 1.5, "models": {}})
    event = payloads.event("pi-1", payloads.REJECTED, model="iris", serial=3, reason="bad")
    for payload, check in (
        (status, payloads.check_status),
        (health, payloads.check_health),
        (event, payloads.check_event),
    ):
        assert check(payloads.decode(payloads.encode(payload), "t"), "t") == payload


def test_status_carries_tags_trusted_keys_and_desired_against_actual() -> None:
    model = {
        "version": "1.0.0", "state": "rejected", "serial": 4,
        "reason": "delivery of 1.1.0 refused: parity: ...",
        "desired": {"version": "1.1.0", "serial": 5, "source": "fleet", "decision": "rejected",
                    "reason": "parity: ..."},
    }  # fmt: skip
    status = payloads.status(
        "pi-1", "north", "online", {"iris": model}, tags={"ring": "canary"},
        trusted_keys=["0123456789abcdef"],
    )  # fmt: skip
    assert status["tags"] == {"ring": "canary"}
    assert status["trusted_keys"] == ["0123456789abcdef"]
    wire = payloads.check_status(payloads.decode(payloads.encode(status), "t"), "t")
    assert wire["models"]["iris"]["desired"]["decision"] == "rejected"
    assert payloads.status("pi-1", "north", "online", {})["tags"] == {}
    # An older agent's status (no tags, no desired, a state this one no longer uses) is read.
    older = {"state": "online", "models": {"iris": {"version": "1.0.0", "state": "updating"}}}
    assert payloads.check_status(older, "t") == older
    assert set(payloads.MODEL_STATES) >= {"active", "probation", "downloading", "installing",
                                          "rejected", "rolled_back", "not_in_rollout"}  # fmt: skip


def test_a_fallback_event_names_each_url_and_its_failure() -> None:
    errors = payloads.origin_errors([("https://cdn.example/a", "artifact origin ...: HTTP 404")])
    event = payloads.event("pi-1", payloads.ARTIFACT_FALLBACK, model="iris", version="1.0.0",
                           artifact_source=payloads.BROKER_CHUNKS, errors=errors)  # fmt: skip
    wire = payloads.check_event(payloads.decode(payloads.encode(event), "t"), "t")
    assert wire["errors"] == [
        {"url": "https://cdn.example/a", "error": "artifact origin ...: HTTP 404"}
    ]


def test_event_leaves_out_what_it_does_not_know() -> None:
    event = payloads.event("pi-1", payloads.VERIFIED, model="iris", version=None)
    assert "version" not in event


@pytest.mark.parametrize(
    ("check", "payload", "message"),
    [
        (payloads.check_status, {"state": "sleeping"}, "state: expected 'online' or 'offline'"),
        (payloads.check_status, {"state": "online", "since": "yesterday"}, "since: 'yesterday'"),
        (payloads.check_status, {"state": "online", "models": []}, "models: expected an object"),
        (payloads.check_health, {"cpu_percent": "high"}, "cpu_percent: expected a number"),
        (payloads.check_health, {"time": "later"}, "time: 'later' is not an RFC 3339 time"),
        (payloads.check_health, {"models": {"m": {"p99_ms": True}}}, "models.m: p99_ms"),
        (payloads.check_event, {"event": "exploded", "time": rfc3339()}, "event: expected one of"),
        (payloads.check_event, {"event": "activated"}, "time: missing"),
        (payloads.check_event, {"event": "activated", "time": rfc3339(), "serial": "3"},
         "serial: expected an integer"),
        (payloads.check_results, {"device": "d", "results": [{"seq": 1}]}, "results[0]: missing"),
        (payloads.check_results, {"device": 7, "results": []}, "device: expected a string"),
        (payloads.check_status, {"state": "online", "tags": {"ring": 1}},
         "tags: expected an object of strings"),
        (payloads.check_status, {"state": "online", "trusted_keys": "abc"},
         "trusted_keys: expected a list of key ids"),
        (payloads.check_status, {"state": "online", "models": {"m": {"serial": "3"}}},
         "models.m: serial: expected an integer or null"),
        (payloads.check_status,
         {"state": "online", "models": {"m": {"desired": {"source": "cloud"}}}},
         "models.m.desired: source: expected 'device' or 'fleet'"),
        (payloads.check_health, {"buffer": {"dropped": {"max_rows": "x"}}},
         "buffer.dropped: max_rows: expected a number"),
        (payloads.check_event, {"event": "artifact_fallback", "time": rfc3339(), "errors": []},
         "errors: expected a non-empty list of objects with strings url and error"),
        (payloads.check_event, {"event": "verified", "time": rfc3339(), "artifact_source": "usb"},
         "artifact_source: expected one of origin, broker_chunks, store"),
    ],
)  # fmt: skip
def test_checks_name_the_field(check: object, payload: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        check(payload, "edge/devices/d/x")  # type: ignore[operator]
    assert message in str(caught.value)
    assert str(caught.value).startswith("edge/devices/d/x: ")


def test_result_json_is_the_shape_the_buffer_builds_in_sql(tmp_path: object) -> None:
    """The forwarder's SQL fast path and result_json must give the same objects."""
    from pathlib import Path

    from agent.config import BufferConfig
    from agent.results.buffer import ResultBuffer
    from agent.results.rows import Result

    buffer = ResultBuffer(Path(str(tmp_path)) / "b.db", BufferConfig())
    buffer.record(Result(1.5, "iris", "1.0.0", [[1, 2.5]], {"prediction": ["a"]}, 0.25))
    buffer.record(Result(2.0, 'q"uote', "2.0", None, {"prediction": [1]}, 1.0))
    sql = buffer.take_batch_json(10)
    rows = buffer.take_batch(10)
    buffer.close()
    assert sql is not None
    batch = payloads.results_head("d") + sql.json.encode() + payloads.RESULTS_TAIL
    by_python = payloads.results_head("d") + b",".join(r.to_json().encode() for r in rows)
    assert json.loads(batch) == json.loads(by_python + payloads.RESULTS_TAIL)
    payloads.check_results(json.loads(batch), "results")
