"""broker-config scripts: revoking accounts, refusing bad names, certificates' SANs."""

from __future__ import annotations

import subprocess

from tests.fixtures.broker import CONFIG, Broker


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
