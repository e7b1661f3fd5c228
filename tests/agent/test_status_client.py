"""How `edge-agent status` shows the agent's /status to a person."""

from __future__ import annotations

from agent.config import Config
from agent.status_client import format_status, local_url


def test_summary_shows_models_broker_buffer_and_drops() -> None:
    text = format_status(
        {
            "device": "pi-7",
            "fleet": "greenhouse",
            "agent_version": "0.1.0",
            "uptime_s": 3725.2,
            "broker": {"url": "mqtts://broker:8883", "state": "connected"},
            "buffer": {
                "rows": 12,
                "bytes": 3481,
                "oldest_age_s": 2.5,
                "dropped": {"max_rows": 4, "disk_full": 0},
            },
            "models": {
                "iris": {"version": "1.1.0", "previous": "1.0.0", "state": "active"},
                "rf": {
                    "version": "2.0.0",
                    "previous": "2.1.0",
                    "state": "rolled_back",
                    "reason": "p99 3.4x",
                },
            },
        }
    )
    assert text.splitlines() == [
        "device   pi-7 (fleet greenhouse), agent 0.1.0",
        "uptime   1h 2m",
        "broker   mqtts://broker:8883: connected",
        "buffer   12 results, 3.4 KiB, oldest 2s; dropped max_rows 4",
        "models",
        "  iris             1.1.0      active (previous 1.0.0)",
        "  rf               2.0.0      rolled_back (previous 2.1.0): p99 3.4x",
    ]


def test_summary_shows_tags_and_a_desired_version_that_is_not_served() -> None:
    desired = {"version": "1.2.0", "serial": 9, "source": "fleet", "decision": "not_in_rollout"}
    text = format_status({
        "device": "pi-7", "fleet": "f", "agent_version": "0.1.0", "tags": {"ring": "canary"},
        "broker": {}, "buffer": {},
        "models": {"iris": {"version": "1.1.0", "state": "not_in_rollout",
                            "reason": "not in rollout (bucket 52 >= 50%)", "desired": desired}},
    })  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "device   pi-7 (fleet f), agent 0.1.0, tags ring=canary"
    assert lines[-2:] == [
        "  iris             1.1.0      not_in_rollout: not in rollout (bucket 52 >= 50%)",
        "                   desired 1.2.0 (serial 9, fleet): not_in_rollout",
    ]


def test_no_models_says_so() -> None:
    text = format_status({"device": "d", "fleet": "f", "models": {}, "buffer": {}, "broker": {}})
    assert "models   none installed" in text


def test_wildcard_listen_address_is_reached_on_loopback() -> None:
    cfg = Config()
    cfg.http.host, cfg.http.port = "0.0.0.0", 9000
    assert local_url(cfg, "/status") == "http://127.0.0.1:9000/status"
    cfg.http.host = "::"
    assert local_url(cfg, "/status") == "http://[::1]:9000/status"
