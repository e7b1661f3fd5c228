"""Every ``edge-fleet`` command over MQTT 3.1.1 (``--mqtt-protocol 3.1.1``) against a real
mosquitto: what works the same, and what 3.1.1 cannot do said plainly.

The delivery and inventory commands run in this process; the exporter as the program.
The collector over 3.1.1 is tests/fleet/test_collect_partition.py and
tests/cluster/test_fleet_nats.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from agent.wire import payloads
from fleet.cli import main
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, desired, retain_status, retained

ROOT = Path(__file__).resolve().parents[2]
V311 = ["--mqtt-protocol", "3.1.1"]


def run(broker: Broker, keypair: Keypair | None, *args: str) -> int:
    return main([*cli(broker, keypair, *args), *V311])


def test_delivery_and_inventory_commands_work_over_311(
    broker: Broker,
    keypair: Keypair,
    iris_package: Path,
    iris_package_v2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    retain_status(broker, "pi-1", "f1")
    assert run(broker, keypair, "publish", str(iris_package), "--fleet", "f1") == 0
    assert run(broker, keypair, "publish", str(iris_package_v2), "--fleet", "f1") == 0
    assert run(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "50") == 0
    assert (desired(broker)["version"], desired(broker)["rollout"]["percent"]) == ("1.1.0", 50)
    assert run(broker, keypair, "rollback", "iris", "--fleet", "f1") == 0
    assert desired(broker)["version"] == "1.0.0"
    capsys.readouterr()

    assert run(broker, None, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["desired"]
    assert [(r["fleet"], r["version"]) for r in rows] == [("f1", "1.0.0")]
    assert run(broker, None, "history", "iris", "--fleet", "f1", "--json") == 0
    versions = {e["version"] for e in json.loads(capsys.readouterr().out)["history"]}
    assert versions == {"1.0.0", "1.1.0"}
    assert run(broker, None, "status", "--json", "--wait", "0.5") == 0
    view = json.loads(capsys.readouterr().out)
    assert [(d["device"], d["state"]) for d in view["devices"]] == [("pi-1", "online")]

    assert run(broker, None, "unpublish", "iris", "--fleet", "f1") == 0
    assert "edge/fleets/f1/models/iris/desired" not in retained(broker, "edge/fleets/+/models/+/+")
    assert run(broker, None, "gc") == 0
    retain_status(broker, "pi-1", "f1", state=payloads.OFFLINE)
    assert run(broker, None, "forget", "pi-1") == 0
    assert "edge/devices/pi-1/status" not in retained(broker, "edge/devices/+/status")


def test_live_events_arrive_over_311(broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    device = broker.client()
    event = payloads.event("pi-1", "activated", model="iris", version="1.0.0")

    def send_later() -> None:
        time.sleep(1.5)  # after the command subscribed (it waits for the SUBACK first)
        device.publish("edge/devices/pi-1/events", payloads.encode(event), qos=1)

    threading.Thread(target=send_later, daemon=True).start()
    try:
        assert run(broker, None, "events", "--wait", "4", "--json") == 0
    finally:
        device.disconnect()
        device.loop_stop()
    events = json.loads(capsys.readouterr().out)["events"]
    assert [(e["device"], e["event"]) for e in events] == [("pi-1", "activated")]


def test_a_denied_publish_under_311_is_named_as_the_likely_cause(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MQTT 5 names the ACL's refusal; 3.1.1 has no reason codes and mosquitto drops the
    publish, so the command says what is likely."""
    device = broker.add_device("d1", "f1")
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", creds=device)
    assert main([*args, *V311]) == 1
    err = capsys.readouterr().err
    assert "no answer within 10 s (under MQTT 3.1.1 a publish the ACL denies is dropped" in err
    assert "may d1 publish to edge/fleet-tools/" in err


def test_exporter_serves_over_311_and_refuses_a_share_group(broker: Broker) -> None:
    retain_status(broker, "pi-1", "f1")
    creds = broker.operator
    argv = [sys.executable, "-m", "fleet", "exporter", "--listen", "127.0.0.1:0",
            "--broker", broker.operator_url, "--username", creds.username,
            "--password-file", str(creds.password_file), *V311]  # fmt: skip
    refused = subprocess.run([*argv, "--share-group", "g"], cwd=ROOT, capture_output=True, check=False,
                             text=True, timeout=30)  # fmt: skip
    assert refused.returncode == 2
    assert "--share-group: --mqtt-protocol 3.1.1, which has no shared subscriptions" in (
        refused.stderr
    )
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"serving (http://\S+/metrics)", line)
        assert match, line
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(match.group(1), timeout=5) as answer:
                text = answer.read().decode()
            if 'edge_fleet_device_online{device="pi-1",fleet="f1"} 1.0' in text:
                break
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
