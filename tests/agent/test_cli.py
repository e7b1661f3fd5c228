"""``edge-agent`` commands: what they print and the exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from tests.fixtures.agent import edge_agent_command, free_port


@pytest.fixture
def config(tmp_path: Path, keypair: Any) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[models]\ntrusted_keys = ["{keypair.pub}"]\nkeep_versions = 2\n'
        f"[http]\nport = {free_port()}\n"
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command_and_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("run", "check-config", "status", "install", "models", "rollback", "demo"):
        assert command in out
    assert run(capsys, "bogus")[0] == 2
    assert run(capsys)[0] == 2
    code, _, err = run(capsys, "install")
    assert code == 2
    assert "package" in err


def test_check_config_ok(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert (code, err) == (0, "")
    assert out.startswith(f"config OK ({config})")
    config.write_text(config.read_text() + '[device.tags]\nsite = "north"\nring = "canary"\n')
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert (code, err) == (0, "")
    assert "  tags   ring=canary, site=north\n" in out


def test_check_config_names_a_bad_tag_by_its_key(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    config.write_text(config.read_text() + '[device.tags]\nsite = "no rth"\n')
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert (code, out) == (1, "")
    assert err.startswith("edge-agent: config: device.tags.site: 'no rth' is not a plain name")


def test_check_config_lists_every_problem_with_its_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[http]\nport = "eighty"\n[models]\nkeep_versions = 0\ntrusted_keys = ["/no/key.pub"]\n'
    )
    code, out, err = run(capsys, "check-config", "--config", str(bad))
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["config"] * 3
    assert any("http.port: 'eighty' is not valid, expected an integer" in line for line in lines)
    assert any("models.keep_versions: 0 is not valid" in line for line in lines)
    assert any("models.trusted_keys[0]: '/no/key.pub' does not exist" in line for line in lines)


def test_check_config_with_a_missing_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "check-config", "--config", str(tmp_path / "nope.toml"))
    assert code == 1
    assert err == f"edge-agent: config: {tmp_path / 'nope.toml'}: no such configuration file\n"


def test_install_models_rollback(
    capsys: pytest.CaptureFixture[str],
    config: Path,
    tmp_path: Path,
    iris_package: Path,
    iris_package_v2: Path,
) -> None:
    code, out, err = run(capsys, "install", str(iris_package), "--config", str(config))
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "installed iris 1.0.0 (serial 1): active"
    assert "no agent is running here" in out

    # A .tar of the package works the same.
    tar_path = tmp_path / "iris-1.1.0.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(iris_package_v2, arcname="iris-1.1.0")
    code, out, _ = run(capsys, "install", str(tar_path), "--config", str(config))
    assert code == 0
    assert "installed iris 1.1.0 (serial 2): active" in out

    code, out, _ = run(capsys, "models", "--config", str(config))
    assert code == 0
    assert re.search(r"^\s+\* 1\.1\.0\s+active$", out, re.M)
    assert re.search(r"^\s+1\.0\.0\s+previous$", out, re.M)

    code, out, _ = run(capsys, "rollback", "iris", "--config", str(config))
    assert code == 0
    assert out.splitlines()[0] == "rolled back iris: 1.1.0 -> 1.0.0"
    code, out, _ = run(capsys, "models", "--json", "--config", str(config))
    assert '"active": "1.0.0"' in out

    # The old manifest cannot be replayed after the rollback; the message says what to do.
    code, out, err = run(capsys, "install", str(iris_package), "--config", str(config))
    assert (code, out) == (1, "")
    assert err == (
        "edge-agent: error: manifest serial 1 for 'iris' is not above the last accepted serial 2"
        "; iris 1.0.0 is active already: nothing to install\n"
    )
    code, out, _ = run(capsys, "rollback", "iris", "--to", "1.1.0", "--config", str(config))
    assert (code, out.splitlines()[0]) == (0, "rolled back iris: 1.0.0 -> 1.1.0")
    code, out, err = run(capsys, "install", str(iris_package), "--config", str(config))
    assert (code, out) == (1, "")
    assert err == (
        "edge-agent: error: manifest serial 1 for 'iris' is not above the last accepted serial 2"
        "; re-sign it with a higher serial: `edge-model sign PACKAGE --key KEY --serial 3`"
        "; or, as iris 1.0.0 is still installed, `edge-agent rollback iris --to 1.0.0` serves it"
        " again\n"
    )


def test_refusals_are_one_line_and_tracebacks_need_verbose(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    code, _, err = run(capsys, "rollback", "iris", "--config", str(config))
    assert code == 1
    assert err == "edge-agent: error: rollback: model 'iris' is not installed\n"
    code, _, err = run(capsys, "install", str(tmp_path / "missing"), "--config", str(config))
    assert code == 1
    assert err.count("\n") == 1
    assert "no such package" in err
    code, _, err = run(
        capsys, "install", str(tmp_path / "missing"), "--config", str(config), "--verbose"
    )
    assert code == 1
    assert "Traceback" in err


def test_status_without_an_agent_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, _, err = run(capsys, "status", "--config", str(config))
    assert code == 1
    assert err.startswith("edge-agent: error: no agent answers at http://127.0.0.1:")
    assert err.count("\n") == 1


def test_running_agent_status_and_installs_beside_it(
    start_agent: Any, tmp_path: Path, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("let-me-in\n")
    agent = start_agent(
        {"http": {"token_file": str(token)}, "models": {"trusted_keys": [str(keypair.pub)]}},
        packages=[iris_package],
    )
    result = agent.cli("status")
    assert result.returncode == 0, result.stderr
    assert "device   test-device-0 (fleet default)" in result.stdout
    assert re.search(r"^  iris\s+1\.0\.0\s+active$", result.stdout, re.M)
    assert "broker   -: offline (no broker configured)" in result.stdout

    # `edge-agent install` writes the store; the running agent swaps the model in.
    result = agent.cli("install", str(iris_package_v2))
    assert result.returncode == 0, result.stderr
    assert "the running agent now serves iris 1.1.0" in result.stdout
    code, body = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
    assert (code, body["version"]) == (200, "1.1.0")

    result = agent.cli("rollback", "iris")
    assert result.returncode == 0, result.stderr
    assert "the running agent now serves iris 1.0.0" in result.stdout
    status = agent.status()["models"]["iris"]
    # A rollback beside the agent is a rollback like any other: /status says so.
    assert (status["version"], status["previous"], status["state"]) == (
        "1.0.0",
        "1.1.0",
        "rolled_back",
    )
    assert agent.stop() == 0


def test_agent_restarted_after_kill_9_serves_the_active_version(
    start_agent: Any, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    agent = start_agent(
        {"models": {"trusted_keys": [str(keypair.pub)]}}, packages=[iris_package, iris_package_v2]
    )
    agent.kill()
    agent.start()
    assert agent.status()["models"]["iris"]["version"] == "1.1.0"


def test_run_with_a_bad_config_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[http]\nport = -1\n")
    result = subprocess.run(
        [*edge_agent_command(), "run", "--config", str(bad)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == "edge-agent: config: http.port: -1 is not valid, expected 0..65535\n"


def test_demo_prints_a_curl_line_that_works(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.Popen(
        [*edge_agent_command(), "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("curl "):
                break
        curl = next((line.strip() for line in lines if line.strip().startswith("curl ")), None)
        assert curl is not None, f"no curl line in: {lines}"
        assert f"http://127.0.0.1:{port}/predict" in curl
        result = subprocess.run(
            shlex.split(curl), check=False, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0
        assert '"prediction": [' in result.stdout or '"prediction":[' in result.stdout
        assert any(name in result.stdout for name in ("setosa", "versicolor", "virginica"))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    assert list(tmp_path.iterdir()) == []  # the demo's temp state is gone, nothing left in cwd


def test_run_notifies_systemd_ready_after_serving_and_stopping_on_sigterm(
    start_agent: Any, tmp_path: Path, iris_package: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    try:
        agent = start_agent(
            {"models": {"allow_unsigned": True}},
            packages=[iris_package],
            env={"NOTIFY_SOCKET": str(sock_path)},
            wait=False,
        )
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready
        assert "STATUS=serving iris 1.0.0; no broker; backlog 0" in ready
        # READY comes only once HTTP serves: the model answers right away.
        code, _ = agent.request("POST", "/predict", {"features": [[5.1, 3.5, 1.4, 0.2]]})
        assert code == 200
        agent.proc.send_signal(signal.SIGTERM)
        messages = []
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert agent.proc.wait(timeout=20) == 0
    finally:
        sock.close()


def test_run_with_a_broker_announces_models_and_their_changes(
    start_agent: Any, broker: Any, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    creds = broker.add_device("test-device-0", "default")
    statuses = broker.subscribe("edge/devices/test-device-0/status")
    agent = start_agent(
        {"mqtt": broker.mqtt_settings(creds), "models": {"trusted_keys": [str(keypair.pub)]}},
        packages=[iris_package],
    )

    def announced(version: str) -> Callable[[list[Any]], bool]:
        def check(messages: list[Any]) -> bool:
            bodies = [json.loads(m.payload) for m in messages]
            return any(
                b.get("state") == "online"
                and (b.get("models") or {}).get("iris", {}).get("version") == version
                for b in bodies
            )

        return check

    statuses.wait_for(announced("1.0.0"), timeout=15)
    assert agent.wait_for(lambda s: s["broker"]["connected"])["broker"]["url"] == broker.url
    assert agent.install(iris_package_v2).returncode == 0
    statuses.wait_for(announced("1.1.0"), timeout=15)
    assert agent.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_install_as_root_leaves_the_store_to_the_state_folder_owner(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path, iris_package: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # the service's own user (DynamicUser= under systemd)
    code, _, err = run(capsys, "install", str(iris_package), "--config", str(config))
    assert (code, err) == (0, "")
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in (state / "models").rglob("*")}
    assert owners == {(65534, 65534)}


def test_run_on_a_taken_port_fails_in_one_line_and_the_fixture_picks_another(
    start_agent: Any, iris_package: Path
) -> None:
    agent = start_agent({"models": {"allow_unsigned": True}}, packages=[iris_package], start=False)
    taken = agent.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        agent.start()
        assert "edge-agent: error: http.host/http.port: cannot listen on 127.0.0.1:" in agent.logs()
        assert agent.port != taken
        assert agent.status()["models"]["iris"]["version"] == "1.0.0"


def test_an_unusable_state_folder_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, iris_package: Path
) -> None:
    not_a_folder = tmp_path / "state"
    not_a_folder.write_text("a file where the state folder should be")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{not_a_folder}"\n')
    code, _, err = run(capsys, "install", str(iris_package), "--config", str(cfg))
    assert code == 1
    assert err == (
        f"edge-agent: error: state_dir: the model store {not_a_folder}/models cannot be used "
        "(Not a directory); run as the agent's user or root\n"
    )
