"""Configuration: defaults without a file, env overrides, every problem listed, secrets."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from agent.config import DEFAULT_CONFIG_PATH, SECTIONS, load_config
from agent.secrets import read_secret, resolve_secret_path
from agent.wire.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_no_file_at_the_default_path_gives_safe_defaults() -> None:
    assert not DEFAULT_CONFIG_PATH.exists()
    cfg = load_config(env={})
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8080)
    assert cfg.mqtt.url == ""  # offline: serves and buffers
    assert cfg.state_dir == "./edge-agent-state"
    assert cfg.models.keep_versions >= 2
    assert cfg.source == "defaults"


def test_state_folder_from_systemd_state_directory() -> None:
    cfg = load_config(env={"STATE_DIRECTORY": "/var/lib/edge-agent"})
    assert cfg.models_path == Path("/var/lib/edge-agent/models")
    assert cfg.buffer_path == Path("/var/lib/edge-agent/buffer.db")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'state_dir = "/srv/a"\n[http]\nport = 9000\n[models]\ntrusted_keys = []\n'
        '[buffer]\nmax_age = "2d"\nmax_bytes = "10MiB"\n',
    )
    cfg = load_config(
        path,
        env={
            "EDGE_AGENT_HTTP_PORT": "9100",
            "EDGE_AGENT_DEVICE_ID": "pi-17",
            "EDGE_AGENT_STATE_DIR": "/srv/b",
            "EDGE_AGENT_MODELS_ALLOW_UNSIGNED": "yes",
            "EDGE_AGENT_HEALTH_INTERVAL_S": "5m",
        },
    )
    assert cfg.http.port == 9100
    assert cfg.device.id == "pi-17"
    assert cfg.state_dir == "/srv/b"
    assert cfg.models.allow_unsigned is True
    assert cfg.health.interval_s == 300.0
    assert cfg.buffer.max_age == 2 * 86400.0
    assert cfg.buffer.max_bytes == 10 * 1024 * 1024
    assert cfg.source == str(path)


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[device]\nfleet = "greenhouse"\n')
    assert load_config(env={"EDGE_AGENT_CONFIG": str(path)}).device.fleet == "greenhouse"


def test_every_bad_key_is_listed_with_its_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[http]\nport = 70000\nhots = "x"\n[models]\nkeep_versions = 1\n'
        '[buffer]\nrecord = "some"\n[mqtt]\nurl = "http://broker"\n[extra]\na = 1\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"EDGE_AGENT_HEALTH_INTERVAL_S": "often"})
    problems = info.value.problems
    expected = [
        "http.port: 70000",
        "http.hots: unknown key",
        "models.keep_versions: 1",
        "buffer.record: 'some'",
        "mqtt.url: 'http://broker'",
        "extra: unknown key or section",
        "health.interval_s: 'often'",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), f"{start!r} not in {problems}"
    assert len(problems) == len(expected)
    assert all("expected" in p or "unknown" in p for p in problems)


@pytest.mark.parametrize("value", ["..", ".", ".hidden", "a/b"])
def test_device_and_fleet_are_plain_names(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f'[device]\nid = "{value}"\nfleet = "{value}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [p.split(":")[0] for p in info.value.problems] == ["device.id", "device.fleet"]
    assert all("not starting with a dot" in p for p in info.value.problems)


def test_device_tags_from_a_table_or_the_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[device]\nid = "pi-1"\n[device.tags]\nsite = "north"\nring = "canary"\n'
    )
    assert load_config(path, env={}).device.tags == {"site": "north", "ring": "canary"}
    env = {"EDGE_AGENT_DEVICE_TAGS": "site=south,ring=stable"}
    assert load_config(path, env=env).device.tags == {"site": "south", "ring": "stable"}
    assert load_config(env={}).device.tags == {}


@pytest.mark.parametrize(
    ("toml", "env", "problem"),
    [
        ('[device.tags]\nsite = "no rth"\n', {}, "device.tags.site: 'no rth' is not a plain name"),
        ("[device.tags]\nsite = 3\n", {}, "device.tags.site: 3 is not a plain name"),
        ('[device]\ntags = ["a"]\n', {}, "device.tags: expected a table of name = value"),
        ("", {"EDGE_AGENT_DEVICE_TAGS": "site"}, "device.tags: 'site' is not key=value"),
    ],
)
def test_a_bad_tag_is_reported_with_its_key(
    tmp_path: Path, toml: str, env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, toml), env=env)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_a_missing_file_asked_for_by_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.toml", env={})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[http\nport = 1\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(path, env={})


def test_secrets_are_read_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "http-token").write_text("s3cret\n")
    (creds / "mqtt-password").write_text("hunter2\n")
    path = write(
        tmp_path,
        '[http]\ntoken_file = "http-token"\n'
        '[mqtt]\nurl = "mqtts://broker:8883"\nusername = "pi-1"\npassword_file = "mqtt-password"\n',
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert read_secret(cfg.http.token_file) == "s3cret"
    assert read_secret(cfg.mqtt.password_file) == "hunter2"

    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "http.token_file: 'http-token' does not exist" in str(info.value)
    assert "mqtt.password_file: 'mqtt-password' does not exist" in str(info.value)


def test_example_config_loads_and_shows_every_key() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "agent.toml"
    cfg = load_config(example, env={})
    assert cfg.source == str(example)
    text = example.read_text()
    sections = dict(re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S))
    missing = [
        f"{section}.{f.name}"
        for section, klass in SECTIONS.items()
        for f in fields(klass)
        if not re.search(rf"^#?\s*{f.name} = ", sections.get(section, ""), re.M)
    ]
    assert not missing, f"examples/agent.toml does not show: {missing}"


def test_secret_from_the_units_credential_folder_by_its_plain_name(tmp_path: Path) -> None:
    # systemd loads the folder as credential "edge": files arrive as edge_<name>.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "edge_mqtt.password").write_text("s3cret\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_secret_path("mqtt.password", env) == creds / "edge_mqtt.password"
    assert resolve_secret_path("/abs/mqtt.password", env) == Path("/abs/mqtt.password")


TLS_CONFIG = (
    '[mqtt]\nurl = "mqtts://broker:8883"\nca = "ca.crt"\ncert = "client.crt"\nkey = "client.key"\n'
)


def test_tls_files_are_looked_up_among_the_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the unit's LoadCredential= hands over: a file by its own name, or by
    # systemd's edge_<name> for the files of the credential folder.
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("ca.crt", "edge_client.crt", "edge_client.key"):
        (creds / name).write_text("-----BEGIN X-----\n")
    path = write(tmp_path, TLS_CONFIG)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # none of the names exists relative to the working folder
    cfg = load_config(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    # The files that were checked are the files the connection is handed.
    assert cfg.mqtt.ca == str(creds / "ca.crt")
    assert cfg.mqtt.cert == str(creds / "edge_client.crt")
    assert cfg.mqtt.key == str(creds / "edge_client.key")
    # An absolute path stays as it is.
    absolute = write(tmp_path, f'[mqtt]\nurl = "mqtts://broker:8883"\nca = "{creds / "ca.crt"}"\n')
    assert load_config(absolute, env={}).mqtt.ca == str(creds / "ca.crt")


def test_a_tls_file_found_nowhere_is_reported_with_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "edge_client.crt").write_text("x")
    (creds / "edge_client.key").write_text("x")
    path = write(tmp_path, TLS_CONFIG)
    monkeypatch.chdir(creds.parent)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert main(["check-config", "--config", str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert (
        f"mqtt.ca: 'ca.crt' does not exist or is not a file (looked in $CREDENTIALS_DIRECTORY"
        f" {creds} as 'ca.crt' and 'edge_ca.crt', then in {tmp_path})" in lines[0]
    )
    # By hand, outside the unit: the message says why the credentials were not searched.
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [p.split(":")[0] for p in info.value.problems] == ["mqtt.ca", "mqtt.cert", "mqtt.key"]
    assert all("$CREDENTIALS_DIRECTORY is not set" in p for p in info.value.problems)
