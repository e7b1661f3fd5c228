"""The docs are tested: every command, HTTP route, MQTT topic and config key is documented."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from agent.config import SECTIONS
from agent.wire.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def all_docs() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))])


def subcommands(module: str) -> list[str]:
    """Subcommands as the command's own --help lists them: ``{a,b,c}``."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from {module} import main; sys.exit(main(['--help']))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout
    match = re.search(r"\{([a-z,-]+)\}", out)
    assert match, f"{module} --help lists no subcommands:\n{out}"
    return match.group(1).split(",")


@pytest.mark.parametrize(
    ("command", "module"),
    [("edge-model", "converter.cli"), ("edge-agent", "agent.cli"), ("edge-fleet", "fleet.cli")],
)
def test_every_command_is_documented(command: str, module: str) -> None:
    docs = all_docs()
    missing = [sub for sub in subcommands(module) if f"{command} {sub}" not in docs]
    assert not missing, f"undocumented commands: {[f'{command} {m}' for m in missing]}"


# The routes of the contract, as the docs should name them.
ROUTES = [
    "POST /predict",
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2/models/{model}",
    "GET /v2/models/{model}/versions/{version}",
    "GET /v2/models/{model}/ready",
    "GET /v2/models/{model}/versions/{version}/ready",
    "POST /v2/models/{model}/infer",
    "POST /v2/models/{model}/versions/{version}/infer",
    "GET /v2/models/{model}/config",
    "GET /v2/models/{model}/versions/{version}/config",
    "GET /metrics",
    "GET /status",
]


def test_every_route_is_documented() -> None:
    docs = (DOCS / "http-api.md").read_text()
    missing = [r for r in ROUTES if r not in docs]
    assert not missing, f"docs/http-api.md does not name: {missing}"


def test_every_topic_is_documented() -> None:
    docs = (DOCS / "protocol.md").read_text()
    topics = Topics()
    placeholders = {
        "fleet": "{fleet}",
        "device": "{device}",
        "model": "{model}",
        "sha256": "{sha256}",
        "index": "{index}",
        "command": "{command}",
    }
    missing = []
    for name, method in inspect.getmembers(topics, inspect.ismethod):
        params = list(inspect.signature(method).parameters)
        if name.startswith("_") or name.endswith("_all") or name.startswith("all_"):
            continue
        if not params or any(p not in placeholders for p in params):
            continue
        topic = method(*(placeholders[p] for p in params))
        if topic not in docs:
            missing.append(topic)
    assert not missing, f"docs/protocol.md does not name: {missing}"


def test_every_config_key_is_documented() -> None:
    docs = (DOCS / "configuration.md").read_text()
    missing = [
        f"{section}.{f.name}"
        for section, klass in SECTIONS.items()
        for f in fields(klass)
        if f"`{section}.{f.name}`" not in docs
    ]
    assert "state_dir" in docs
    assert not missing, f"docs/configuration.md does not document: {missing}"


def test_the_chunk_size_default_is_stated_once_and_everywhere_the_same() -> None:
    from agent.wire.manifest import DEFAULT_CHUNK_SIZE

    mib = DEFAULT_CHUNK_SIZE // (1024 * 1024)
    assert mib * 1024 * 1024 == DEFAULT_CHUNK_SIZE
    root = DOCS.parent
    places = {
        "docs/protocol.md": f"({mib} MiB by default",
        "docs/broker.md": f"Model chunks are {mib} MiB by default",
        "docs/package-format.md": f"default {DEFAULT_CHUNK_SIZE} ({mib} MiB",
        "broker-config/mosquitto.conf": f"retained chunks of {mib} MiB by default",
    }
    for path, text in places.items():
        assert text in (root / path).read_text(), f"{path} does not say {text!r}"
    for path in ("docs", "broker-config"):
        for f in (root / path).rglob("*"):
            if f.is_file() and f.suffix in {".md", ".conf", ""}:
                assert "256 KiB" not in f.read_text(errors="replace"), f
