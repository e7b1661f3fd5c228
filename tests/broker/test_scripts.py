"""broker-config scripts: revoking accounts, refusing bad names, certificates' SANs."""

from __future__ import annotations

import subprocess

from tests.fixtures.broker import CONFIG, HOST, Broker


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def test_removed_device_can_no_longer_log_in(broker: Broker) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    other = broker.add_device("dev-2", fleet="f1")
    done = run(str(CONFIG / "mkcreds.sh"), "--conf-dir", str(broker.conf_dir), "remove", "dev-1")
    assert done.returncode == 0, done.stderr
    broker.reload(other)
    assert not broker.can_login(creds)
    assert broker.can_login(other)
    assert "user dev-1\n" not in (broker.conf_dir / "acl").read_text()


def test_names_that_would_escape_the_acl_are_refused(broker: Broker) -> None:
    for name in ["dev/1", "dev+", "#", "a b", "..", "."]:
        done = run(str(CONFIG / "mkcreds.sh"), "--conf-dir", str(broker.conf_dir),
                   "device", name, "--fleet", "f1")  # fmt: skip
        assert done.returncode == 2
        assert f"name: '{name}' is not a plain name" in done.stderr
    done = run(str(CONFIG / "mkcreds.sh"), "--conf-dir", str(broker.conf_dir),
               "device", "dev-1", "--fleet", "f/1")  # fmt: skip
    assert done.returncode == 2 and "--fleet: 'f/1'" in done.stderr


def test_server_certificate_names_localhost_and_extra_sans(tmp_path: object) -> None:
    d = str(tmp_path)
    done = run(str(CONFIG / "mkca.sh"), "--dir", d, "server", "--san", "DNS:broker.example.com")
    assert done.returncode == 0, done.stderr
    text = run("openssl", "x509", "-in", f"{d}/server.crt", "-noout", "-text").stdout
    for name in ["DNS:localhost", "IP Address:127.0.0.1", "DNS:broker.example.com"]:
        assert name in text
    verify = run("openssl", "verify", "-CAfile", f"{d}/ca.crt", f"{d}/server.crt")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_mkconf_reports_a_bad_port(tmp_path: object) -> None:
    done = run(str(CONFIG / "mkconf.sh"), "--conf-dir", f"{tmp_path}/c", "--port", "mqtt")
    assert done.returncode == 2
    assert "--port: 'mqtt' is not a port number" in done.stderr


def test_mkconf_adds_new_header_patterns_to_an_older_acl(broker: Broker) -> None:
    creds = broker.add_device("dev-1", fleet="f1")
    acl = broker.conf_dir / "acl"
    # An ACL rendered before results acks existed, with its accounts.
    acl.write_text(acl.read_text().replace("pattern read edge/devices/%u/results/ack\n", ""))
    args = [str(CONFIG / "mkconf.sh"), "--conf-dir", str(broker.conf_dir),
            "--data-dir", str(broker.data_dir), "--port", str(broker.port), "--bind", HOST,
            "--operator-port", str(broker.operator_port), "--operator-bind", HOST,
            "--log-dest", "stderr"]  # fmt: skip
    assert run(*args).returncode == 0
    text = acl.read_text()
    assert text.count("pattern read edge/devices/%u/results/ack\n") == 1
    assert "user dev-1\ntopic read edge/fleets/f1/models/+/desired\n" in text
    assert run(*args).returncode == 0 and acl.read_text() == text  # once only
    broker.reload(creds)
    acks = broker.subscribe("edge/devices/dev-1/results/ack", creds)
    broker.client().publish("edge/devices/dev-1/results/ack", b"a", qos=1).wait_for_publish(5)
    acks.wait_for(lambda m: len(m) == 1)


def test_collectors_and_readers_cannot_take_a_device_name(broker: Broker) -> None:
    broker.add_device("dev-1", fleet="f1")
    for kind in ("collector", "reader"):
        done = run(str(CONFIG / "mkcreds.sh"), "--conf-dir", str(broker.conf_dir), kind, "dev-1")
        assert done.returncode == 1 and "'dev-1' is a device account already" in done.stderr
    broker.add_collector("coll-1")
    done = run(str(CONFIG / "mkcreds.sh"), "--conf-dir", str(broker.conf_dir),
               "device", "coll-1", "--fleet", "f1")  # fmt: skip
    assert (
        done.returncode == 1 and "'coll-1' is an operator-listener account already" in done.stderr
    )
