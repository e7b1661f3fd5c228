"""mqtt.urls and mqtt.protocol: configuration, check-config, and the failover policy
(``agent/link_failover.py``: which URL next, which MQTT version, how long to wait)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import MqttConfig, load_config
from agent.link_failover import Failover
from agent.wire.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env or {})
    return info.value.problems


# --- configuration -----------------------------------------------------------------


def test_urls_and_protocol_from_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nurls = ["mqtt://a:1883", "mqtt://b"]\nprotocol = "3.1.1"\n')
    cfg = load_config(path, env={})
    assert cfg.mqtt.broker_urls == ["mqtt://a:1883", "mqtt://b"]
    assert cfg.mqtt.protocol == "3.1.1"
    env = {
        "EDGE_AGENT_MQTT_URLS": "mqtt://n1:1883, mqtt://n2:1883",
        "EDGE_AGENT_MQTT_PROTOCOL": "5",
    }
    cfg = load_config(path, env=env)
    assert cfg.mqtt.urls == ["mqtt://n1:1883", "mqtt://n2:1883"]
    assert cfg.mqtt.protocol == "5"
    # A bare number in TOML is read as the version it names.
    assert load_config(write(tmp_path, "[mqtt]\nprotocol = 5\n"), env={}).mqtt.protocol == "5"
    # Defaults: auto, and mqtt.url alone still works.
    cfg = load_config(write(tmp_path, '[mqtt]\nurl = "mqtt://a"\n'), env={})
    assert (cfg.mqtt.protocol, cfg.mqtt.broker_urls) == ("auto", ["mqtt://a"])


def test_every_bad_url_and_protocol_is_named(tmp_path: Path) -> None:
    urls = ", ".join(f'"mqtt://n{i}"' for i in range(17))
    found = problems(tmp_path, f'[mqtt]\nurls = [{urls}]\nprotocol = "4"\n')
    assert "mqtt.urls: 17 URLs, expected 1..16" in found
    assert "mqtt.protocol: '4' is not valid, expected 'auto', '5' or '3.1.1'" in found
    found = problems(tmp_path, '[mqtt]\nurls = ["mqtt://a", "http://b", "mqtt://a"]\n')
    assert found == [
        "mqtt.urls[1]: 'http://b' is not valid, expected mqtt://host[:port] or mqtts://host[:port]",
        "mqtt.urls[2]: 'mqtt://a' is already mqtt.urls[0]",
    ]
    found = problems(tmp_path, '[mqtt]\nurls = ["mqtt://a", "mqtts://b:8883"]\n')
    assert found == [
        "mqtt.urls: mixes mqtt:// and mqtts:// (mqtt://a, mqtts://b:8883); use one scheme for all"
    ]


def test_url_must_agree_with_urls(tmp_path: Path) -> None:
    ok = '[mqtt]\nurl = "mqtt://a"\nurls = ["mqtt://a", "mqtt://b"]\n'
    assert load_config(write(tmp_path, ok), env={}).mqtt.broker_urls == ["mqtt://a", "mqtt://b"]
    found = problems(tmp_path, '[mqtt]\nurl = "mqtt://c"\nurls = ["mqtt://a", "mqtt://b"]\n')
    assert found == [
        "mqtt.url / mqtt.urls: both set, and mqtt.url ('mqtt://c') is not the first of"
        " mqtt.urls ('mqtt://a'); keep only mqtt.urls"
    ]


def test_check_config_shows_the_brokers_and_the_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f'state_dir = "{tmp_path}"\n[mqtt]\nurls = ["mqtt://a", "mqtt://b"]\n')
    assert main(["check-config", "--config", str(path)]) == 0
    assert "  mqtt   mqtt://a, mqtt://b (protocol auto)" in capsys.readouterr().out
    bad = write(tmp_path, '[mqtt]\nprotocol = "six"\n')
    assert main(["check-config", "--config", str(bad)]) != 0
    assert "mqtt.protocol: 'six' is not valid" in capsys.readouterr().err


# --- the failover policy -------------------------------------------------------------


def policy(*urls: str, protocol: str = "auto", rand: float = 1.0) -> Failover:
    m = MqttConfig(urls=list(urls), protocol=protocol, reconnect_min_s=1.0, reconnect_max_s=8.0)
    return Failover(m, rand=lambda: rand)


def test_round_robin_with_full_jitter_bounds() -> None:
    f = policy("mqtt://a", "mqtt://b", "mqtt://c")  # rand 1.0: the upper bound of each wait
    assert f.current.url == "mqtt://a"
    waits = [f.failed() for _ in range(9)]
    order = [e.url for e in f.endpoints]
    assert order == ["mqtt://a", "mqtt://b", "mqtt://c"] and f.current.url == "mqtt://a"
    # A move after one failure: up to min; after each whole round: min * 2**rounds, capped.
    assert waits == [1.0, 1.0, 2.0, 1.0, 1.0, 4.0, 1.0, 1.0, 8.0]
    assert f.moves == 9 and f.failures == 9
    f.connected()
    assert f.failures == 0
    assert f.lost() == 1.0 and f.current.url == "mqtt://b"  # a lost connection moves on
    assert policy("mqtt://a", rand=0.25).failed() == 0.5  # one URL: no move, a round each
    assert policy("mqtt://a").moves == 0


def test_auto_learns_311_at_once_from_an_unsupported_version_answer() -> None:
    f = policy("mqtt://nats", "mqtt://mosquitto")
    assert f.current.speaks == "5"
    assert f.unsupported() == 0.0  # no wait, no move: the same URL again with 3.1.1
    assert (f.current.url, f.current.speaks, f.moves, f.failures) == ("mqtt://nats", "3.1.1", 0, 0)
    f.connected()
    f.lost()
    assert (f.current.url, f.current.speaks) == ("mqtt://mosquitto", "5")  # per URL
    # Fixed versions are never changed: "not MQTT 5" is then a failure.
    fixed = policy("mqtt://nats", protocol="5")
    assert fixed.unsupported() == 2.0 and fixed.current.speaks == "5"
    assert policy("mqtt://a", protocol="3.1.1").current.speaks == "3.1.1"


def test_hang_ups_on_v5_downgrade_only_when_a_311_probe_then_connects() -> None:
    f = policy("mqtt://a")
    f.dropped()
    assert f.current.speaks == "5"  # one dropped CONNECT (an election) is not enough
    f.dropped()
    assert f.current.speaks == "3.1.1" and f.current.probing
    f.dropped()  # the probe fared no better: not about the version
    assert f.current.speaks == "5" and f.current.v5_drops == 0
    f.dropped()
    f.dropped()
    f.connected()  # the probe connected: 3.1.1 from then on
    assert f.current.speaks == "3.1.1" and not f.current.learn
    f.dropped()
    f.dropped()
    assert f.current.speaks == "3.1.1"
    # A v5 connect in between resets the count.
    g = policy("mqtt://a")
    g.dropped()
    g.connected()
    g.dropped()
    assert g.current.speaks == "5"
