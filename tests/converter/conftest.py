"""Shared by the converter's CLI tests: calling edge-model in-process, a converted package."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import joblib
import pytest

from converter.cli import main
from tests.fixtures.models import Keypair


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """edge-model in-process: exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("edge-model: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(scope="session")
def iris_joblib(tmp_path_factory: pytest.TempPathFactory, iris_estimator: Any) -> Path:
    path = tmp_path_factory.mktemp("models") / "iris.joblib"
    joblib.dump(iris_estimator, path)
    return path


@pytest.fixture(scope="session")
def converted(
    tmp_path_factory: pytest.TempPathFactory, iris_joblib: Path, keypair: Keypair
) -> Path:
    """A signed iris package written by the CLI; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("converted") / "iris"
    assert main([
        "convert", str(iris_joblib), "--name", "iris", "--version", "1.0.0",
        "--key", str(keypair.key), "-o", str(out),
    ]) == 0  # fmt: skip
    return out


@pytest.fixture
def package(converted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "pkg"))
