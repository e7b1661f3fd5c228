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


def final_stage(steps: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """The final stage's instructions and the image its files come from.

    A final ``FROM scratch`` that copies a whole stage (``COPY --from=runtime / /``, to
    shed what that stage deleted from its base) gets that stage's instructions first.
    """
    starts = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    final = steps[starts[-1] :]
    if final[0][1] != "scratch":
        return final, final[0][1]
    copied = [arg for word, arg in final if word == "COPY" and arg.endswith(" / /")]
    assert copied, "FROM scratch without COPY --from=STAGE / /"
    stage = copied[0].split()[0].removeprefix("--from=")
    begin = next(i for i in starts if steps[i][1].endswith(f" AS {stage}"))
    end = next(i for i in starts if i > begin)
    runtime = steps[begin:end]
    return runtime + final[1:], runtime[0][1].removesuffix(f" AS {stage}")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_non_root_with_a_healthcheck_and_no_compiler(path: Path) -> None:
    final, base = final_stage(instructions(path.read_text()))
    assert base == "debian:bookworm-slim", f"{path.name}: the final image's files come from {base}"
    users = [arg for word, arg in final if word == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"{path.name}: USER {users[-1]}: want uid >= 10000"
    assert any(word == "HEALTHCHECK" for word, _ in final), f"{path.name}: no HEALTHCHECK"
    runs = " ".join(arg for word, arg in final if word == "RUN")
    for tool in ("gcc", "build-essential", "python3-dev", "make "):
        assert tool not in runs, f"{path.name}: the final stage installs {tool.strip()}"
    steps = instructions(path.read_text())
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    if steps[last_from][1] == "scratch":
        # An image on scratch has no PATH to extend: its ENV must name every folder.
        env = " ".join(arg for word, arg in steps[last_from:] if word == "ENV")
        assert "PATH=" in env and "/usr/bin" in env and "$PATH" not in env, (
            f"{path.name}: an image FROM scratch needs a whole PATH, got ENV {env}"
        )


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
