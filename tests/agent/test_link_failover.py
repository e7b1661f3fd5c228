"""mqtt.urls: the link moves to the next broker when one dies, and keeps its status right.

Two real mosquittos holding the same device account stand in for two cluster nodes.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import generate_latest

from agent.link import Message
from agent.metrics import Metrics
from agent.paho_link import MqttClient
from agent.wire import payloads
from tests.agent.test_paho_link import make_config, start, wait_until
from tests.fixtures.broker import Broker, Creds


@pytest.fixture
def clients() -> Any:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.stop(timeout=1)


def shared_device(a: Broker, b: Broker, device: str) -> Creds:
    """``device`` with the same password on both brokers: b gets a's device accounts."""
    creds = a.add_device(device, fleet="f1")
    # Content only: b keeps its own files' owner and mode (mosquitto reads them).
    shutil.copyfile(a.conf_dir / "passwd", b.conf_dir / "passwd")
    shutil.copyfile(a.conf_dir / "acl", b.conf_dir / "acl")
    b.reload(creds)
    return creds


def states(log: Any, topic: str) -> list[str]:
    return [json.loads(m.payload)["state"] for m in log.on(topic)]


def test_moves_to_the_second_broker_when_the_first_dies(
    broker_factory: Callable[..., Broker], clients: list[MqttClient]
) -> None:
    a, b = broker_factory(), broker_factory()
    creds = shared_device(a, b, "dev-1")
    cfg = make_config(a, creds, urls=[a.url, b.url])
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 0.5, 2
    metrics = Metrics()
    got: list[Message] = []
    c = MqttClient(cfg, metrics)
    clients.append(c)
    c.subscribe("edge/devices/dev-1/models/+/desired", 1, got.append)
    c.start()
    assert c.wait_connected(10)
    assert c.report()["url"] == a.url and c.report()["urls"] == [a.url, b.url]
    assert c.report()["moves"] == 0

    status_b = b.subscribe("edge/devices/dev-1/status")
    a.kill()
    killed = time.monotonic()
    wait_until(lambda: c.connected and c.url == b.url, 15, "connected to the second broker")
    moved_s = time.monotonic() - killed
    assert c.report()["moves"] == 1 and c.reconnects == 1
    status_b.wait_for(lambda ms: "online" in states(status_b, "edge/devices/dev-1/status"))
    # The subscription was renewed on b: a retained desired state published there arrives.
    b.client().publish(
        "edge/devices/dev-1/models/iris/desired", b'{"v": 2}', qos=1, retain=True
    ).wait_for_publish(5)
    wait_until(lambda: any(m.payload == b'{"v": 2}' for m in got), 10, "desired state on b")
    text = generate_latest(metrics.registry).decode()
    assert "edge_agent_mqtt_moves_total 1.0" in text
    print(f"\nmoved to the second mosquitto {moved_s:.2f}s after kill -9 of the first")

    # b goes too, a comes back: round robin, back to a.
    a.start()
    b.kill()
    wait_until(lambda: c.connected and c.url == a.url, 20, "back on the first broker")
    assert c.report()["moves"] >= 2


def test_a_late_offline_will_is_answered_with_online(
    broker: Broker, clients: list[MqttClient]
) -> None:
    """NATS publishes the will of an old connection late, maybe through another node: the
    device reads its own status and says online again while it is connected."""
    creds = broker.add_device("dev-1", fleet="f1")
    c = start(clients, make_config(broker, creds))
    assert c.wait_connected(10)
    topic = "edge/devices/dev-1/status"
    seen = broker.subscribe(topic)
    seen.wait_for(lambda ms: states(seen, topic) == ["online"])

    late_will = payloads.status("dev-1", "f1", "offline", {}, reason="connection lost")
    broker.client().publish(topic, json.dumps(late_will), qos=1, retain=True).wait_for_publish(5)
    seen.wait_for(lambda ms: states(seen, topic)[-2:] == ["offline", "online"])
    assert c.status_reasserts == 1
    # The broker now holds online: what a newcomer (edge-fleet status) reads.
    fresh = broker.subscribe(topic)
    fresh.wait_for(bool)
    assert states(fresh, topic) == ["online"]

    # Its own offline when it stops is not answered.
    c.stop()
    fresh.wait_for(lambda ms: states(fresh, topic)[-1:] == ["offline"])
    assert c.status_reasserts == 1


def test_a_real_agent_reports_its_move_in_status(
    broker_factory: Callable[..., Broker], start_agent: Any
) -> None:
    """edge-agent run with mqtt.urls from the environment; /status follows the move."""
    a, b = broker_factory(), broker_factory()
    creds = shared_device(a, b, "test-device-0")
    settings = a.mqtt_settings(creds)
    del settings["url"]
    agent = start_agent(
        {"mqtt": {**settings, "reconnect_min_s": 0.5, "reconnect_max_s": 2.0}},
        env={"EDGE_AGENT_MQTT_URLS": f"{a.url},{b.url}"},
    )
    agent.wait_for(lambda s: s["broker"]["connected"], timeout=15)
    broker_block = agent.status()["broker"]
    assert broker_block["url"] == a.url and broker_block["urls"] == [a.url, b.url]
    assert (broker_block["protocol"], broker_block["moves"]) == ("5", 0)
    a.kill()
    agent.wait_for(lambda s: s["broker"]["connected"] and s["broker"]["url"] == b.url, 15)
    assert agent.status()["broker"]["moves"] == 1


def test_a_reassert_racing_a_stop_queues_its_online_before_the_stop_offline() -> None:
    """The re-assert has checked "not leaving" and is about to queue online when the
    supervisor stops the link: the stop's offline must still be the last word."""
    from agent.config import Config
    from agent.link import PublishHandle
    from agent.link_status import DeviceStatus

    cfg = Config()
    cfg.device.id, cfg.device.fleet = "dev-1", "f1"
    queued: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def publish(topic: str, payload: dict[str, Any], **_: Any) -> PublishHandle:
        queued.append(payload["state"])
        return PublishHandle(topic)

    def connected() -> bool:
        if threading.current_thread().name == "reassert":
            inside.set()  # between "not leaving" and queueing online
            release.wait(5)
        return True

    status = DeviceStatus(cfg, publish, connected)
    racer = threading.Thread(target=status._reassert, name="reassert")
    racer.start()
    assert inside.wait(5)

    def stop() -> None:  # what MqttClient.stop does, in order
        status.leave()
        status.publish("offline", reason="stopped")

    stopper = threading.Thread(target=stop)
    stopper.start()
    time.sleep(0.2)  # the stop is now waiting for the re-assert, or (unfixed) done
    release.set()
    racer.join(5)
    stopper.join(5)
    assert queued == ["online", "offline"]
