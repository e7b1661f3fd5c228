"""The model store: versions on disk, the atomic active pointer, serials, pruning."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.models.runtime import check_parity, load_model
from agent.models.store import ModelStore
from agent.wire.errors import PackageError
from agent.wire.package import check_artifact, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[3]


def versioned(package: Path, version: str, dest: Path, serial: int = 1) -> Path:
    """A copy of ``package`` under another version number (unsigned: the store does not care)."""
    out = dest / f"pkg-{version}"
    shutil.copytree(package, out)
    raw = read_manifest(out).unsigned_dict()
    raw.update(version=version, serial=serial)
    write_manifest(out, raw)
    return out


def add_and_activate(store: ModelStore, package: Path) -> str:
    manifest = read_manifest(package)
    with store.locked():
        store.add_version(package, manifest)
        store.activate(manifest.name, manifest.version, serial=manifest.serial)
    return manifest.version


def test_install_layout_and_active_pointer(tmp_path: Path, iris_package: Path) -> None:
    store = ModelStore(tmp_path / "models")
    add_and_activate(store, iris_package)
    assert store.names() == ["iris"]
    assert store.versions("iris") == ["1.0.0"]
    version_dir = tmp_path / "models" / "iris" / "1.0.0"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "model.onnx"]
    pointer = json.loads((tmp_path / "models" / "iris" / "active.json").read_text())
    assert pointer["version"] == "1.0.0"
    assert pointer["previous"] is None
    assert pointer["serial"] == 1
    assert store.last_serial("iris") == 1
    assert store.last_serial("other") == -1


def test_names_keep_the_order_of_first_install_across_restarts(
    tmp_path: Path, iris_package: Path, regressor_package: Path, columns_package: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    add_and_activate(store, iris_package)
    add_and_activate(store, columns_package)  # 'columns' sorts before 'iris'
    add_and_activate(store, regressor_package)
    assert store.names() == ["iris", "columns", "ridge"]
    add_and_activate(store, versioned(iris_package, "1.5.0", tmp_path, serial=9))
    assert ModelStore(tmp_path / "models").names() == ["iris", "columns", "ridge"]


def test_a_store_from_before_the_order_file_lists_its_names_first(
    tmp_path: Path, iris_package: Path, columns_package: Path, regressor_package: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    add_and_activate(store, iris_package)
    add_and_activate(store, columns_package)
    (tmp_path / "models" / ".order.json").unlink()  # as an older agent left it
    assert store.names() == ["columns", "iris"]  # by name: nothing else is known
    add_and_activate(store, regressor_package)
    assert ModelStore(tmp_path / "models").names() == ["columns", "iris", "ridge"]


def test_activation_keeps_previous_and_serial_never_goes_down(
    tmp_path: Path, iris_package: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    add_and_activate(store, versioned(iris_package, "1.0.0", tmp_path, serial=5))
    add_and_activate(store, versioned(iris_package, "2.0.0", tmp_path, serial=7))
    pointer = store.active("iris")
    assert pointer is not None
    assert (pointer.version, pointer.previous, pointer.serial) == ("2.0.0", "1.0.0", 7)
    # A local rollback re-activates the old version without its old serial.
    with store.locked():
        store.activate("iris", "1.0.0")
    pointer = store.active("iris")
    assert pointer is not None
    assert (pointer.version, pointer.previous, pointer.serial) == ("1.0.0", "2.0.0", 7)


def test_versions_sort_numerically(tmp_path: Path, iris_package: Path) -> None:
    store = ModelStore(tmp_path / "models", keep_versions=10)
    for v in ("1.10.0", "1.2.0", "1.9.1"):
        add_and_activate(store, versioned(iris_package, v, tmp_path))
    assert store.versions("iris") == ["1.2.0", "1.9.1", "1.10.0"]


def test_prune_keeps_keep_versions_and_never_active_or_previous(
    tmp_path: Path, iris_package: Path
) -> None:
    store = ModelStore(tmp_path / "models", keep_versions=2)
    for v in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
        add_and_activate(store, versioned(iris_package, v, tmp_path))
    assert store.prune("iris") == ["1.0.0", "2.0.0"]
    assert store.versions("iris") == ["3.0.0", "4.0.0"]
    # Roll back to 3.0.0 then install 5.0.0: 4.0.0 is the oldest unprotected one.
    with store.locked():
        store.activate("iris", "3.0.0")
    add_and_activate(store, versioned(iris_package, "5.0.0", tmp_path))
    assert store.prune("iris") == ["4.0.0"]
    assert store.versions("iris") == ["3.0.0", "5.0.0"]


def test_activating_a_version_that_is_not_installed_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(PackageError, match=r"iris 9\.9\.9 is not installed"):
        store.activate("iris", "9.9.9")


def test_leftovers_of_an_interrupted_install_are_removed_at_open(
    tmp_path: Path, iris_package: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    add_and_activate(store, iris_package)
    half = tmp_path / "models" / "iris" / ".tmp-2.0.0-1234"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half a model")
    ModelStore(tmp_path / "models")
    assert not half.exists()
    assert store.versions("iris") == ["1.0.0"]


def test_same_version_with_another_artifact_is_refused_while_active(
    tmp_path: Path, iris_package: Path, regressor_package: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    add_and_activate(store, iris_package)
    other = tmp_path / "other"
    shutil.copytree(regressor_package, other)
    raw = read_manifest(other).unsigned_dict()
    raw.update(name="iris", version="1.0.0")
    write_manifest(other, raw)
    with (
        store.locked(),
        pytest.raises(PackageError, match="already installed with another artifact"),
    ):
        store.add_version(other, read_manifest(other))


# The child loops: add a version, activate it, prune; the parent SIGKILLs it at random.
_CHURN = textwrap.dedent(
    """
    import itertools, sys
    from pathlib import Path
    from agent.wire.package import read_manifest
    from agent.models.store import ModelStore

    store = ModelStore(Path(sys.argv[1]), keep_versions=2)
    packages = [Path(p) for p in sys.argv[2:]]
    print("looping", flush=True)
    for package in itertools.cycle(packages):
        manifest = read_manifest(package)
        with store.locked():
            store.add_version(package, manifest)
            store.activate(manifest.name, manifest.version, serial=manifest.serial)
            store.prune(manifest.name)
    """
)


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_complete_active_version(
    tmp_path: Path, iris_package: Path
) -> None:
    root = tmp_path / "models"
    packages = [versioned(iris_package, v, tmp_path) for v in ("1.0.0", "1.1.0", "1.2.0")]
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHURN, str(root), *map(str, packages)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"looping\n"
        time.sleep(rng.uniform(0.01, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()

        store = ModelStore(root, keep_versions=2)
        pointer = store.active("iris")
        assert pointer is not None
        for version in (pointer.version, pointer.previous):
            if version is None:
                continue
            version_dir = store.version_dir("iris", version)
            manifest = store.manifest("iris", version)
            assert manifest.version == version
            check_artifact(version_dir, manifest)
        model = load_model(
            store.version_dir("iris", pointer.version), store.manifest("iris", pointer.version)
        )
        check_parity(model)
        leftovers = [p.name for p in (root / "iris").iterdir() if p.name.startswith(".")]
        assert leftovers == []
