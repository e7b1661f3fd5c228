"""The broker inside Debian's stock mosquitto.conf (include_dir /etc/mosquitto/conf.d).

Debian's main file sets pid_file, persistence, persistence_location and log_dest, then
reads every conf.d/*.conf. A full mkconf.sh configuration dropped there stops mosquitto
("Duplicate persistence_location"); ``mkconf.sh --snippet`` renders one without what the
main file sets. The main file here is a copy of the installed package's, with its paths
moved into the test's folder.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.broker.test_acl import publish_reason
from tests.broker.test_persistence import saved
from tests.fixtures.broker import CONFIG, MOSQUITTO, Broker, debian_main_conf, free_port


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, timeout=30
    )


def test_a_full_configuration_in_conf_d_stops_debians_mosquitto(tmp_path: Path) -> None:
    """The defect: what mkconf.sh writes without --snippet, read through include_dir."""
    root = tmp_path / "b"
    root.mkdir()
    main = debian_main_conf(root)
    done = run(CONFIG / "mkconf.sh", "--conf-dir", root / "conf.d", "--data-dir", root / "d",
               "--port", str(free_port()), "--operator-port", str(free_port()))  # fmt: skip
    assert done.returncode == 0, done.stderr
    broker = run("timeout", "5", MOSQUITTO, "-c", main)
    assert broker.returncode == 3, broker.stdout + broker.stderr
    assert "Duplicate persistence_location" in broker.stdout + broker.stderr


def test_the_snippet_leaves_out_what_debians_main_file_sets(
    broker_factory: Callable[..., Broker],
) -> None:
    b = broker_factory(debian=True)
    snippet = (b.root / "conf.d" / "edge.conf").read_text()
    lines = [ln.split()[0] for ln in snippet.splitlines() if ln and not ln.startswith("#")]
    for key in ("persistence_location", "log_dest", "pid_file"):  # the main file sets them
        assert key not in lines
    # Ours win where the main file is silent or repeats a value mosquitto takes twice.
    for key in ("per_listener_settings", "autosave_interval", "listener", "acl_file"):
        assert key in lines
    assert not (b.conf_dir / "mosquitto.conf").exists()


def test_debians_mosquitto_serves_devices_and_operators_and_keeps_retained_state(
    broker_factory: Callable[..., Broker],
) -> None:
    b = broker_factory(debian=True)
    device = b.add_device("pi-1", fleet="f1")
    assert b.can_login(device) and b.can_login(b.operator)
    assert publish_reason(b.client(device), "edge/fleets/f1/models/m/desired") == 135
    op = b.client(b.operator)
    op.publish("edge/fleets/f1/models/m/desired", b"desired-7c1d", qos=1, retain=True)
    desired = b.subscribe("edge/fleets/f1/models/+/desired", device)
    assert [m.payload for m in desired.wait_for(lambda m: len(m) == 1)] == [b"desired-7c1d"]
    # Persistence is the main file's: /var/lib/mosquitto/mosquitto.db, moved to data/.
    saved(b, b"desired-7c1d")
    b.kill()
    b.start()
    again = b.subscribe("edge/fleets/f1/models/+/desired", device)
    assert [m.payload for m in again.wait_for(lambda m: len(m) == 1)] == [b"desired-7c1d"]
    # And so is logging: the main file's log_dest file.
    assert "Loading config file" in (b.root / "log" / "mosquitto.log").read_text()


def test_mkconf_refuses_a_snippet_the_main_file_would_not_read(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    main = debian_main_conf(root)
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    base = [CONFIG / "mkconf.sh", "--conf-dir", root / "edge", "--main-conf", main]
    done = run(*base, "--snippet", elsewhere / "edge.conf")
    assert done.returncode == 2
    assert f"has no 'include_dir {elsewhere}'" in done.stderr
    done = run(*base, "--snippet", root / "conf.d" / "edge.cfg")
    assert done.returncode == 2 and "must end in .conf" in done.stderr
    assert not (root / "conf.d" / "edge.conf").exists()
