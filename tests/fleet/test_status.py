"""`edge-fleet status` against a real mosquitto, the operator account standing in for devices."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fleet.cli import main
from tests.fixtures.broker import Broker

ROOT = Path(__file__).resolve().parents[2]


# --- payloads in the exact shapes of docs/architecture.md "Payloads" ----------------------


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def status_payload(
    device: str, fleet: str, state: str = "online", models: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "device": device,
        "fleet": fleet,
        "state": state,
        "since": now_rfc3339(),
        "agent_version": "0.1.0",
        "models": models
        if models is not None
        else {"iris": {"version": "1.2.0", "previous": "1.1.0", "state": "active", "serial": 7}},
    }


def health_payload(
    device: str,
    fleet: str,
    *,
    inferences: int = 10,
    p99_ms: float = 4.5,
    rows: int = 0,
    model_version: str = "1.2.0",
) -> dict[str, Any]:
    return {
        "device": device,
        "fleet": fleet,
        "time": now_rfc3339(),
        "uptime_s": 120.5,
        "agent_version": "0.1.0",
        "cpu_percent": 12.5,
        "load": [0.5, 0.25, 0.125],
        "memory": {"used": 300_000_000, "available": 600_000_000, "agent_rss": 80_000_000},
        "disk_free_bytes": 5_000_000_000,
        "soc_temp_c": 48.3,
        "models": {
            "iris": {
                "version": model_version,
                "inferences": inferences,
                "errors": 1,
                "p50_ms": 1.25,
                "p99_ms": p99_ms,
            }
        },
        "buffer": {
            "rows": rows,
            "bytes": rows * 100,
            "oldest_age_s": 30.0 if rows else None,
            "dropped": {"disk_full": 2},
        },
        "mqtt": {"reconnects": 3},
        "forwarded": 42,
    }


def publish(client: mqtt.Client, topic: str, payload: Any, *, retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)


def broker_args(broker: Broker) -> list[str]:
    return [
        "--broker",
        broker.operator_url,
        "--username",
        broker.operator.username,
        "--password-file",
        str(broker.operator.password_file),
    ]


@contextlib.contextmanager
def health_every(
    client: mqtt.Client, payloads: dict[str, dict[str, Any]], period: float = 0.2
) -> Iterator[None]:
    """Publish each device's health every ``period`` s, like agents with a short interval."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for device, payload in payloads.items():
                fresh = {**payload, "time": now_rfc3339()}
                client.publish(f"edge/devices/{device}/health", json.dumps(fresh), qos=0)
            stop.wait(period)

    thread = threading.Thread(target=loop, name="test-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


@pytest.fixture
def fleet_on_broker(broker: Broker) -> Iterator[tuple[Broker, mqtt.Client]]:
    """Three devices with retained status: pi-1, pi-2 in fleet `north`, pi-3 (offline) in `south`."""
    client = broker.client()
    publish(client, "edge/devices/pi-1/status", status_payload("pi-1", "north"), retain=True)
    publish(
        client,
        "edge/devices/pi-2/status",
        status_payload(
            "pi-2",
            "north",
            models={
                "iris": {"version": "1.3.0", "previous": "1.2.0", "state": "probation", "serial": 8}
            },
        ),
        retain=True,
    )
    publish(
        client,
        "edge/devices/pi-3/status",
        status_payload("pi-3", "south", state="offline"),
        retain=True,
    )
    yield broker, client
    client.disconnect()
    client.loop_stop()


def run_status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lists_every_device_with_status_and_latest_health(
    fleet_on_broker: tuple[Broker, mqtt.Client], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, client = fleet_on_broker
    with health_every(client, {"pi-1": health_payload("pi-1", "north", p99_ms=7.5, rows=12)}):
        code, out, err = run_status(capsys, "--json", "--wait", "0.8", *broker_args(broker))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1
    assert doc["broker"] == broker.operator_url
    devices = {d["device"]: d for d in doc["devices"]}
    assert [d["device"] for d in doc["devices"]] == ["pi-1", "pi-2", "pi-3"]  # fleet, then id
    pi1, pi2, pi3 = devices["pi-1"], devices["pi-2"], devices["pi-3"]
    assert (pi1["fleet"], pi1["state"], pi1["agent_version"]) == ("north", "online", "0.1.0")
    assert pi1["models"]["iris"]["version"] == "1.2.0"
    assert pi1["models"]["iris"]["state"] == "active"
    assert pi1["models"]["iris"]["p99_ms"] == 7.5
    assert pi1["p99_ms"] == 7.5
    assert pi1["buffer"]["rows"] == 12
    assert pi1["buffer"]["dropped"] == {"disk_full": 2}
    assert 0 <= pi1["health_age_s"] < 1.5
    assert pi1["cpu_percent"] == 12.5 and pi1["soc_temp_c"] == 48.3
    # Retained status only: known, but no health and no live sighting.
    assert pi2["models"]["iris"] == {
        "version": "1.3.0",
        "previous": "1.2.0",
        "state": "probation",
        "serial": 8,
        "inferences": None,
        "errors": None,
        "p50_ms": None,
        "p99_ms": None,
        "reason": None,
        "desired": None,  # nothing desired on this broker
        "deployment": None,
    }
    assert pi2["health_age_s"] is None and pi2["buffer"] is None and pi2["p99_ms"] is None
    assert (pi3["fleet"], pi3["state"]) == ("south", "offline")


def test_table_has_aligned_columns_and_a_summary(
    fleet_on_broker: tuple[Broker, mqtt.Client], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, client = fleet_on_broker
    with health_every(client, {"pi-1": health_payload("pi-1", "north", p99_ms=7.5, rows=12)}):
        code, out, _ = run_status(capsys, "--wait", "0.8", *broker_args(broker))
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    header, rows, summary = lines[0], lines[1:-1], lines[-1]
    assert header.split("  ")[0] == "DEVICE"
    headings = ("FLEET", "MODEL", "VERSION", "DESIRED", "STATE", "SEEN", "BACKLOG")
    starts = [header.index(c) for c in headings]
    p99_end = header.index("P99") + 3  # numbers are aligned right
    by_device = {r.split()[0]: r for r in rows}
    assert set(by_device) == {"pi-1", "pi-2", "pi-3"}
    for row in rows:  # every column starts where its heading does
        for start in starts:
            assert row[start - 2 : start] == "  " and row[start] != " ", (row, start)
    state = starts[headings.index("STATE")]
    pi1 = by_device["pi-1"]
    # Nothing is desired on this broker: the state is the device's own.
    assert pi1[state:].startswith("active")
    assert pi1[:p99_end].endswith("  7.5ms")
    assert "iris" in pi1 and "1.2.0" in pi1 and "12 (30s)" in pi1
    assert "s ago" in pi1
    assert by_device["pi-2"][state:].startswith("probation")
    assert by_device["pi-3"][state:].startswith("offline")
    assert summary == "3 devices, 2 online"
    assert max(len(line) for line in lines) <= 80


def test_fleet_filter_shows_only_that_fleet(
    fleet_on_broker: tuple[Broker, mqtt.Client], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, _ = fleet_on_broker
    code, out, _ = run_status(
        capsys, "--json", "--fleet", "south", "--wait", "0.2", *broker_args(broker)
    )
    assert code == 0
    assert [d["device"] for d in json.loads(out)["devices"]] == ["pi-3"]


def test_malformed_messages_are_ignored_and_the_rest_shown(
    fleet_on_broker: tuple[Broker, mqtt.Client],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker, client = fleet_on_broker
    publish(client, "edge/devices/bad-1/status", b"{not json", retain=True)
    publish(client, "edge/devices/bad-2/status", {"state": "sleepy"}, retain=True)
    with health_every(client, {"pi-1": {**health_payload("pi-1", "north"), "cpu_percent": "high"}}):
        code, out, _ = run_status(capsys, "--json", "--wait", "0.6", *broker_args(broker))
    assert code == 0
    devices = {d["device"]: d for d in json.loads(out)["devices"]}
    assert set(devices) == {"pi-1", "pi-2", "pi-3"}
    assert devices["pi-1"]["health_age_s"] is None  # its health never had the right shape
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        "ignored: edge/devices/bad-2/status: state: expected 'online' or 'offline', got 'sleepy'"
        in warnings
    )
    # Said once per topic, not at every health interval.
    assert (
        warnings.count(
            "ignored: edge/devices/pi-1/health: cpu_percent: expected a number, got 'high'"
        )
        == 1
    )


def test_an_empty_retained_status_forgets_the_device(
    fleet_on_broker: tuple[Broker, mqtt.Client], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, client = fleet_on_broker
    publish(client, "edge/devices/pi-3/status", b"", retain=True)
    code, out, _ = run_status(capsys, "--json", "--wait", "0.2", *broker_args(broker))
    assert code == 0
    assert [d["device"] for d in json.loads(out)["devices"]] == ["pi-1", "pi-2"]


def test_no_devices_prints_an_empty_table(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_status(capsys, "--wait", "0.1", *broker_args(broker))
    assert code == 0
    assert out.splitlines()[-1] == "0 devices, 0 online"


def test_broker_options_come_from_the_environment(
    fleet_on_broker: tuple[Broker, mqtt.Client],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, _ = fleet_on_broker
    monkeypatch.setenv("EDGE_BROKER", broker.operator_url)
    monkeypatch.setenv("EDGE_USERNAME", broker.operator.username)
    monkeypatch.setenv("EDGE_PASSWORD_FILE", str(broker.operator.password_file))
    code, out, err = run_status(capsys, "--json", "--wait", "0.1")
    assert code == 0, err
    assert len(json.loads(out)["devices"]) == 3


def test_other_topic_prefix_sees_only_its_own_devices(
    fleet_on_broker: tuple[Broker, mqtt.Client], capsys: pytest.CaptureFixture[str]
) -> None:
    broker, client = fleet_on_broker
    publish(client, "lab/edge/devices/x-1/status", status_payload("x-1", "lab"), retain=True)
    lab = broker.add_viewer("lab-viewer", prefix="lab/edge")  # an account of that prefix
    login = ["--username", lab.username, "--password-file", str(lab.password_file)]
    code, out, _ = run_status(
        capsys, "--json", "--wait", "0.2", "--topic-prefix", "lab/edge",
        "--broker", broker.operator_url, *login,
    )  # fmt: skip
    assert code == 0
    assert [d["device"] for d in json.loads(out)["devices"]] == ["x-1"]


def test_wrong_password_is_one_line_and_exit_1(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    code, out, err = run_status(
        capsys,
        "--broker",
        broker.operator_url,
        "--username",
        "operator",
        "--password-file",
        str(wrong),
    )
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0
    assert err.startswith(
        f"edge-fleet: error: broker {broker.operator_url}: connection refused (user 'operator')"
    )


def test_unreachable_broker_is_one_line_and_exit_1(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    args = broker_args(broker)
    broker.stop()
    code, _, err = run_status(capsys, *args)
    assert code == 1
    assert (
        err
        == f"edge-fleet: error: broker {broker.operator_url}: cannot connect: Connection refused\n"
    )


def test_tls_with_the_scripts_ca(tls_broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    creds = tls_broker.operator
    common = ["--broker", tls_broker.operator_tls_url, "--username", creds.username,
              "--password-file", str(creds.password_file)]  # fmt: skip
    code, out, err = run_status(
        capsys, "--json", "--wait", "0.1", "--ca", str(tls_broker.ca), *common
    )
    assert code == 0, err
    assert json.loads(out)["devices"] == []
    # Without the CA the server certificate cannot be trusted: refused, in one line.
    code, _, err = run_status(capsys, "--wait", "0.1", *common)
    assert code == 1
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in err
    assert err.count("\n") == 1


def test_watch_redraws_until_ctrl_c(fleet_on_broker: tuple[Broker, mqtt.Client]) -> None:
    broker, client = fleet_on_broker
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "status", "--watch", "--json", "--interval", "0.3",
         "--wait", "0.1", *broker_args(broker)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert len(first["devices"]) == 3
        publish(client, "edge/devices/pi-4/status", status_payload("pi-4", "north"), retain=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = json.loads(proc.stdout.readline())
            if len(frame["devices"]) == 4:
                break
        else:
            pytest.fail("the new device never appeared in a redraw")
        pi4 = next(d for d in frame["devices"] if d["device"] == "pi-4")
        assert pi4["last_seen_age_s"] is not None  # a live status counts as a sighting
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
