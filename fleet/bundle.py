"""A device bundle: everything one device needs to join the fleet, in one .tar.gz.

``edge-fleet enroll`` writes one per device; ``scripts/install-pi.sh --bundle FILE``
installs it. The layout mirrors where the files go on the device::

    pi-042/agent.toml                 -> /etc/edge-agent/agent.toml
    pi-042/ca.crt                     -> /etc/edge-agent/ca.crt        (with --ca)
    pi-042/publisher.pub              -> /etc/edge-agent/publisher.pub (each trusted key)
    pi-042/credentials/mqtt.password  -> /etc/edge-agent/credentials/mqtt.password
    pi-042/SHA256SUMS                 every file above, as ``sha256sum -c`` reads it

The password is a systemd credential: the unit's ``LoadCredential=`` hands it to the
agent, and agent.toml names it relatively (``password_file = "mqtt.password"``). The
CA certificate and the publisher's keys are public and stay in /etc/edge-agent.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.wire.times import rfc3339
from agent.wire.topics import DEFAULT_PREFIX

ETC = "/etc/edge-agent"  # the device's configuration folder (the unit's ConfigurationDirectory)
STATE_DIR = "/var/lib/edge-agent"  # the unit's StateDirectory
PASSWORD_FILE = "mqtt.password"
CA_FILE = "ca.crt"
SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class DeviceSetup:
    """What one device's agent.toml says, and the files that come with it."""

    device: str
    fleet: str
    mqtt_url: str
    password: str
    tags: Mapping[str, str] = field(default_factory=dict)
    ca: bytes | None = None  # the broker's CA certificate, PEM
    trusted_keys: Sequence[tuple[str, bytes]] = ()  # (file name, PEM public key)
    topic_prefix: str = DEFAULT_PREFIX


def _toml(value: str) -> str:
    # A TOML basic string: JSON's escapes are TOML's for every character a name, URL or
    # path holds here.
    return json.dumps(value, ensure_ascii=False)


def agent_toml(setup: DeviceSetup, *, t: float | None = None) -> str:
    """The device's /etc/edge-agent/agent.toml."""
    lines = [
        f"# edge-agent configuration of {setup.device}, written by `edge-fleet enroll`",
        f"# at {rfc3339(t)}. scripts/install-pi.sh --bundle installs it as {ETC}/agent.toml;",
        "# every key is described in docs/configuration.md.",
        "",
        "# The service's StateDirectory, named so that commands run by hand use it too.",
        f"state_dir = {_toml(STATE_DIR)}",
        "",
        "[device]",
        f"id = {_toml(setup.device)}",
        f"fleet = {_toml(setup.fleet)}",
    ]
    if setup.tags:
        lines += ["", "[device.tags]"]
        lines += [f"{key} = {_toml(value)}" for key, value in sorted(setup.tags.items())]
    lines += [
        "",
        "[mqtt]",
        f"url = {_toml(setup.mqtt_url)}",
        f"username = {_toml(setup.device)}",
        f"# A credential: {ETC}/credentials/{PASSWORD_FILE}, handed to the service by the",
        "# unit's LoadCredential= (docs/raspberry-pi.md); never readable at rest by it.",
        f"password_file = {_toml(PASSWORD_FILE)}",
    ]
    if setup.ca is not None:
        lines.append(f"ca = {_toml(f'{ETC}/{CA_FILE}')}")
    if setup.topic_prefix != DEFAULT_PREFIX:
        lines.append(f"topic_prefix = {_toml(setup.topic_prefix)}")
    keys = ", ".join(_toml(f"{ETC}/{name}") for name, _ in setup.trusted_keys)
    lines += [
        "",
        "[models]",
        "# The publisher's public keys: only packages signed by one of them are installed.",
        f"trusted_keys = [{keys}]",
        "",
    ]
    return "\n".join(lines)


def bundle_files(setup: DeviceSetup, *, t: float | None = None) -> dict[str, bytes]:
    """Path inside the bundle's folder -> content, SHA256SUMS last."""
    files = {"agent.toml": agent_toml(setup, t=t).encode()}
    if setup.ca is not None:
        files[CA_FILE] = setup.ca
    for name, pem in setup.trusted_keys:
        files[name] = pem
    files[f"credentials/{PASSWORD_FILE}"] = f"{setup.password}\n".encode()
    files[SUMS] = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in files.items()
    ).encode()
    return files


def write_bundle(setup: DeviceSetup, out_dir: Path, *, t: float | None = None) -> Path:
    """``out_dir/DEVICE.tar.gz``, mode 0600 (it holds the device's password)."""
    path = out_dir / f"{setup.device}.tar.gz"
    mtime = time.time() if t is None else t
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for folder in ("", "/credentials"):
            info = tarfile.TarInfo(f"{setup.device}{folder}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, mtime
            tar.addfile(info)
        for name, data in bundle_files(setup, t=t).items():
            info = tarfile.TarInfo(f"{setup.device}/{name}")
            info.size, info.mtime = len(data), mtime
            info.mode = 0o600 if name.startswith("credentials/") else 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path
