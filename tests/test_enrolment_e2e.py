"""Enrolment end to end: `edge-fleet enroll` makes a bundle, `scripts/install-pi.sh
--bundle` installs it (into a folder standing in for /etc/edge-agent, no systemd), the
installed agent.toml passes `edge-agent check-config`, and an agent started with it logs
in to a real mosquitto with the account enroll made and takes its fleet's desired model.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.cli import main
from fleet.publish import publish
from tests.delivery_helpers import operator, predict_version
from tests.fixtures.agent import RunningAgent
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install-pi.sh"
VENV = Path(sys.executable).parent.parent  # the edge-agent install-pi checks the config with


def make_bundle(broker: Broker, keypair: Keypair, out: Path, device: str = "pi-7") -> Path:
    creds = broker.operator
    code = main(["enroll", device, "--fleet", "greenhouse", "--tags", "site=north", "-o", str(out),
                 "--mqtt-url", broker.url, "--trusted-key", str(keypair.pub),
                 "--conf-dir", str(broker.conf_dir), "--broker", broker.operator_url,
                 "--username", creds.username, "--password-file", str(creds.password_file)])  # fmt: skip
    assert code == 0
    broker.reload()  # as the operator is told to: the new account takes effect
    return out / f"{device}.tar.gz"


def install(bundle: Path, etc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--bundle", str(bundle), "--etc", str(etc), "--config-only",
         "--prefix", str(VENV), "--no-apt"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def test_an_enrolled_device_installs_its_bundle_connects_and_takes_its_fleets_model(
    broker: Broker,
    keypair: Keypair,
    iris_package: Path,
    start_agent: Callable[..., RunningAgent],
    tmp_path: Path,
) -> None:
    bundle = make_bundle(broker, keypair, tmp_path / "bundles")
    etc = tmp_path / "etc"
    done = install(bundle, etc)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (etc / "credentials" / "mqtt.password").stat().st_mode & 0o777 == 0o600
    assert (etc / "publisher.pub").read_bytes() == keypair.pub.read_bytes()
    text = (etc / "agent.toml").read_text()
    config = tomllib.loads(text)
    assert config["models"]["trusted_keys"] == [str(etc / "publisher.pub")]  # --etc moved it
    assert config["mqtt"]["password_file"] == "mqtt.password"  # a credential

    # What the unit gives the agent: $CREDENTIALS_DIRECTORY, here the folder itself.
    env = {"CREDENTIALS_DIRECTORY": str(etc / "credentials")}
    check = subprocess.run(
        [str(VENV / "bin" / "edge-agent"), "check-config", "--config", str(etc / "agent.toml")],
        capture_output=True, text=True, check=False, env={**env, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr

    status = broker.subscribe("edge/devices/pi-7/status")
    # The installed file as it is, with the test's own state folder and HTTP port.
    agent = start_agent(text, env=env)
    online = status.wait_for(lambda m: any(b'"online"' in x.payload for x in m), timeout=30)
    assert json.loads(online[-1].payload)["tags"] == {"site": "north"}  # the bundle's tags
    publish(operator(broker), iris_package, fleet="greenhouse", key=keypair.key)
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=60)
    assert predict_version(agent) == "1.0.0"
    assert agent.status()["device"] == "pi-7"


def repack(bundle: Path, out: Path, *, drop: str = "", spoil: str = "", add: str = "") -> Path:
    """A copy of ``bundle`` without the member ``drop``, with ``spoil`` changed, or with
    an extra member named ``add``."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            if member.name == drop:
                continue
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if member.name == spoil and data is not None:
                data += b"# changed\n"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
        if add:
            info = tarfile.TarInfo(add)
            info.size = 1
            dst.addfile(info, io.BytesIO(b"x"))
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "pi-7/credentials/mqtt.password"}, "lacks credentials/mqtt.password"),
        ({"drop": "pi-7/agent.toml"}, "lacks agent.toml"),
        ({"drop": "pi-7/SHA256SUMS"}, "lacks SHA256SUMS"),
        ({"drop": "pi-7/publisher.pub"}, "lacks publisher.pub (listed in its SHA256SUMS)"),
        ({"spoil": "pi-7/agent.toml"}, "a file does not match its SHA256SUMS"),
        ({"add": "pi-7/../../etc/cron.d/x"}, "is not a file of a device bundle"),
        ({"add": "other/agent.toml"}, "is not a file of a device bundle"),
    ],
)
def test_install_refuses_a_bundle_that_lacks_a_file_naming_it(
    broker: Broker, keypair: Keypair, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    bundle = repack(make_bundle(broker, keypair, tmp_path / "b"), tmp_path / "bad.tar.gz",
                    **change)  # fmt: skip
    etc = tmp_path / "etc"
    done = install(bundle, etc)
    assert done.returncode == 1
    assert "install-pi: bundle bad.tar.gz" in done.stderr
    assert message in done.stderr, done.stderr
    assert not etc.exists()  # checked whole before anything is installed


def test_a_new_bundle_replaces_the_config_and_keeps_the_old_one(
    broker: Broker, keypair: Keypair, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    assert install(make_bundle(broker, keypair, tmp_path / "b1"), etc).returncode == 0
    first = (etc / "agent.toml").read_text()
    main(["enroll", "pi-7", "--fleet", "orchard", "--renew", "-o", str(tmp_path / "b2"),
          "--mqtt-url", broker.url, "--trusted-key", str(keypair.pub),
          "--conf-dir", str(broker.conf_dir)])  # fmt: skip
    done = install(tmp_path / "b2" / "pi-7.tar.gz", etc)
    assert done.returncode == 0, done.stderr
    assert "agent.toml.bak" in done.stdout
    assert (etc / "agent.toml.bak").read_text() == first
    assert tomllib.loads((etc / "agent.toml").read_text())["device"]["fleet"] == "orchard"
