"""The bundled demo package that `edge-agent demo` installs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import agent
from converter.verify import verify

ROOT = Path(__file__).resolve().parents[2]
DEMO = Path(agent.__file__).parent / "demo" / "iris"


def test_bundled_demo_is_a_valid_unsigned_iris_package() -> None:
    result = verify(DEMO)
    m = result.manifest
    assert (m.name, m.version) == ("iris", "1.0.0")
    assert m.signature is None and result.key_id is None
    assert m.classes == ["setosa", "versicolor", "virginica"]
    assert m.prediction_output == "label" and m.probabilities_output == "probabilities"
    assert result.parity_rows >= 8
    assert (DEMO / "model.onnx").stat().st_size < 16_000


def test_demo_script_rebuilds_the_same_interface(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build-demo-model.py"), "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rebuilt = json.loads((tmp_path / "manifest.json").read_text())
    bundled = json.loads((DEMO / "manifest.json").read_text())
    for key in ("name", "version", "inputs", "outputs", "classes", "task"):
        assert rebuilt[key] == bundled[key], key
    assert verify(tmp_path).parity_rows >= 8
