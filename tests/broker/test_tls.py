"""TLS with the CA and certificates from broker-config/mkca.sh."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.fixtures.broker import Broker, Creds


def tls_connect(
    broker: Broker, creds: Creds | None, *, cert: bool, ca: Path | None = None
) -> int | str:
    """Connect over TLS; the CONNACK reason code, or the error that stopped it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if creds is not None and not cert:
        client.username_pw_set(creds.username, creds.password)
    client.tls_set(
        ca_certs=str(ca or broker.ca),
        certfile=str(creds.cert) if cert and creds and creds.cert else None,
        keyfile=str(creds.key) if cert and creds and creds.key else None,
    )
    result: list[int] = []
    done = threading.Event()

    def on_connect(c: mqtt.Client, u: object, f: object, rc: mqtt.ReasonCode, p: object) -> None:
        result.append(rc.value)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect("localhost", broker.tls_port, keepalive=10)
    except (ssl.SSLError, OSError) as e:
        return type(e).__name__
    client.loop_start()
    done.wait(5)
    client.disconnect()
    client.loop_stop()
    return result[0] if result else "no CONNACK"


def test_tls_login_with_password_and_the_scripts_ca(tls_broker: Broker) -> None:
    creds = tls_broker.add_device("dev-1", fleet="f1")
    assert tls_connect(tls_broker, creds, cert=False) == 0


def test_tls_refuses_a_server_the_ca_did_not_sign(tls_broker: Broker, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.crt"
    # A CA of its own: the broker's certificate must not verify against it.
    import subprocess

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "k"), "-subj", "/CN=other", "-out", str(other)],
        check=True, capture_output=True,
    )  # fmt: skip
    creds = tls_broker.add_device("dev-1", fleet="f1")
    assert tls_connect(tls_broker, creds, cert=False, ca=other) in {
        "SSLCertVerificationError",
        "SSLError",
    }


def test_client_certificate_is_the_identity(broker_factory: object) -> None:
    b: Broker = broker_factory(tls=True, require_certificate=True)  # type: ignore[operator]
    creds = b.add_device("dev-1", fleet="f1")
    assert creds.cert is not None
    assert tls_connect(b, creds, cert=True) == 0
    # Without a certificate the handshake itself fails.
    assert tls_connect(b, creds, cert=False) != 0


def test_agent_under_systemd_finds_its_tls_files_among_the_credentials(
    tls_broker: Broker, start_agent: Callable[..., Any], tmp_path: Path
) -> None:
    # As the unit does it: LoadCredential=edge:/etc/edge-agent/credentials hands each
    # file over as $CREDENTIALS_DIRECTORY/edge_<name>; agent.toml names them plainly,
    # and no file by those names exists beside the agent.
    creds = tls_broker.add_device("pi-1", fleet="f1")
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "edge_ca.crt").write_bytes(tls_broker.ca.read_bytes())
    (folder / "edge_mqtt.password").write_text(creds.password + "\n")
    assert not Path("ca.crt").exists() and not Path("mqtt.password").exists()
    config = {
        "device": {"id": "pi-1", "fleet": "f1"},
        "mqtt": {"url": tls_broker.tls_url, "username": "pi-1", "password_file": "mqtt.password",
                 "ca": "ca.crt", "reconnect_min_s": 1, "reconnect_max_s": 1},
    }  # fmt: skip
    env = {"CREDENTIALS_DIRECTORY": str(folder)}
    seen = tls_broker.subscribe("edge/devices/pi-1/status")
    agent = start_agent(config, env=env, start=False)
    check = agent.cli("check-config")
    assert check.returncode == 0, check.stderr
    agent.start()
    seen.wait_for(lambda m: any(json.loads(x.payload)["state"] == "online" for x in m), 20)
    assert agent.wait_for(lambda s: s["broker"]["connected"] is True)["broker"]["connected"]
    assert "certificate verify failed" not in agent.logs()
