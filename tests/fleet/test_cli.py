"""`edge-fleet` as a command: help, exit codes, one-line errors, broker options."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from agent.wire.errors import UsageError
from fleet import cli
from fleet.cli import build_parser, main
from fleet.connection import add_broker_arguments, broker_options

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--broker", "--username", "--password-file", "--ca", "--cert", "--key", "--topic-prefix"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_help_lists_the_commands_and_every_command_has_help() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "status" in done.stdout and "exporter" in done.stdout
    for command in ("status", "exporter"):
        sub = run(command, "--help")
        assert sub.returncode == 0, sub.stderr
        for flag in [*FLAGS, "--verbose"]:
            assert flag in sub.stdout, (command, flag)
        for var in (
            "EDGE_BROKER",
            "EDGE_USERNAME",
            "EDGE_PASSWORD_FILE",
            "EDGE_CA",
            "EDGE_CERT",
            "EDGE_KEY",
        ):
            assert var in sub.stdout, (command, var)


def test_console_script_is_installed() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "edge-fleet"), "--version"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("edge-fleet ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["status", "--no-such-flag"],
        ["exporter"],
        ["status", "--interval", "soon"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: edge-fleet" in capsys.readouterr().err


def test_bad_broker_url_is_usage_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--broker", "http://example.org"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "edge-fleet: error: --broker: 'http://example.org' is not a broker URL like "
        "mqtt://host:1883 or mqtts://host:8883\n"
    )


def test_failure_is_one_line_and_verbose_adds_the_traceback() -> None:
    # A port nothing listens on: the connection is refused at once.
    quiet = run("status", "--broker", "mqtt://127.0.0.1:1")
    assert quiet.returncode == 1
    assert (
        quiet.stderr
        == "edge-fleet: error: broker mqtt://127.0.0.1:1: cannot connect: Connection refused\n"
    )
    loud = run("status", "--verbose", "--broker", "mqtt://127.0.0.1:1")
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.rstrip().endswith("cannot connect: Connection refused")
    # --verbose before the command works as well.
    assert "Traceback" in run("-v", "status", "--broker", "mqtt://127.0.0.1:1").stderr


# --- broker options ----------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_without_flags_or_environment() -> None:
    o = broker_options(parse(), environ={})
    assert (o.url, o.host, o.port, o.tls, o.username, o.password) == (
        "mqtt://localhost:1884", "localhost", 1884, False, None, None,
    )  # fmt: skip
    assert o.topics.status("pi-1") == "edge/devices/pi-1/status"


def test_flags_win_over_environment(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    env = {"EDGE_BROKER": "mqtt://env-host:1999", "EDGE_USERNAME": "env-user",
           "EDGE_PASSWORD_FILE": str(pw), "EDGE_TOPIC_PREFIX": "lab/edge"}  # fmt: skip
    o = broker_options(parse(), environ=env)
    assert (o.host, o.port, o.username, o.password, o.topic_prefix) == (
        "env-host", 1999, "env-user", "s3cret", "lab/edge",
    )  # fmt: skip
    o = broker_options(parse("--broker", "mqtts://flag-host", "--username", "ops"), environ=env)
    assert (o.host, o.port, o.tls, o.username) == ("flag-host", 8883, True, "ops")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--broker", "mqtt://h:99999"], {}, "--broker: 'mqtt://h:99999': Port out of range"),
        ([], {"EDGE_BROKER": "tcp://h"}, "$EDGE_BROKER: 'tcp://h' is not a broker URL"),
        (
            ["--password-file", "/nonexistent/pw", "--username", "u"],
            {},
            "--password-file: /nonexistent/pw: no such file",
        ),
        ([], {"EDGE_CA": "/nonexistent/ca.crt"}, "$EDGE_CA: /nonexistent/ca.crt: no such file"),
        (["--topic-prefix", "edge/#"], {}, "--topic-prefix: 'edge/#' must be topic levels"),
    ],
)
def test_bad_options_name_the_flag_and_value(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError) as exc:
        broker_options(parse(*argv), environ=env)
    assert message in str(exc.value)
    assert exc.value.exit_code == 2


def test_tls_files_need_mqtts_and_cert_needs_key(tmp_path: Path) -> None:
    f = tmp_path / "x.pem"
    f.write_text("x")
    with pytest.raises(
        UsageError, match=r"--ca: .*x.pem: given, but --broker 'mqtt://h' is not mqtts://"
    ):
        broker_options(parse("--broker", "mqtt://h", "--ca", str(f)), environ={})
    with pytest.raises(UsageError, match="--cert and --key: give both or neither"):
        broker_options(parse("--broker", "mqtts://h", "--cert", str(f)), environ={})
    with pytest.raises(UsageError, match="--password-file: given without --username"):
        broker_options(parse("--password-file", str(f)), environ={})


def test_other_modules_register_commands_through_add_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hook fleet/publish.py uses: add_parser(subparsers) returning its parser(s)."""
    (tmp_path / "extra_cmds.py").write_text(
        "from fleet.connection import add_broker_arguments\n"
        "def add_parser(sub):\n"
        "    parsers = []\n"
        "    for name in ('hello', 'wave'):\n"
        "        p = sub.add_parser(name, help=name + ' things')\n"
        "        add_broker_arguments(p)\n"
        "        p.set_defaults(func=lambda args, name=name: print(name, args.verbose) or 0)\n"
        "        parsers.append(p)\n"
        "    return parsers\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("extra_cmds", *cli.COMMAND_MODULES))
    assert "wave things" in build_parser().format_help()
    assert main(["wave", "--verbose"]) == 0
    assert capsys.readouterr().out == "wave True\n"
