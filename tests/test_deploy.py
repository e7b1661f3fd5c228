"""deploy/: the central images' Dockerfiles and the manifests' fast checks.

Building the images, validating and scanning the manifests and running them under
`podman kube play` is `make k8s-e2e` (minutes, root); these run with every `make test`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_dockerfile import instructions, run_hadolint

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [
    ROOT / "deploy/Dockerfile.central",
    ROOT / "deploy/images/mosquitto.Dockerfile",
    ROOT / "deploy/images/postgres.Dockerfile",
]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_at_warning_threshold(path: Path) -> None:
    result = run_hadolint(path)
    assert result.returncode == 0, f"hadolint on {path.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_non_root_with_a_healthcheck_and_no_compiler(path: Path) -> None:
    steps = instructions(path.read_text())
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    final = steps[last_from:]
    assert final[0] == ("FROM", "debian:bookworm-slim")
    users = [arg for word, arg in final if word == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"{path.name}: USER {users[-1]}: want uid >= 10000"
    assert any(word == "HEALTHCHECK" for word, _ in final), f"{path.name}: no HEALTHCHECK"
    runs = " ".join(arg for word, arg in final if word == "RUN")
    for tool in ("gcc", "build-essential", "python3-dev", "make "):
        assert tool not in runs, f"{path.name}: the final stage installs {tool.strip()}"


def test_fleet_imports_without_numpy_or_onnxruntime() -> None:
    # The edge-fleet image leaves the device's inference stack out (deploy/Dockerfile.central);
    # its build imports every fleet module the same way and fails on a new dependency.
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['onnxruntime'] = None\n"
        "import importlib, pkgutil, fleet\n"
        "for m in pkgutil.iter_modules(fleet.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('fleet.' + m.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_monitoring_configmaps_match_the_rules_and_the_dashboard() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/e2e/k8s-monitoring.py", "--check"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_every_manifest_is_listed_in_its_kustomization() -> None:
    # kubectl apply -k applies only what kustomization.yaml lists: a manifest left out
    # would be validated and scanned by make k8s-e2e and still never deployed.
    for folder in (ROOT / "deploy/kubernetes", ROOT / "deploy/kubernetes/edge-agent"):
        listed = (folder / "kustomization.yaml").read_text()
        for path in folder.glob("*.yaml"):
            if path.name != "kustomization.yaml":
                assert f"  - {path.name}\n" in listed, (
                    f"{path} is not in {folder}/kustomization.yaml"
                )
