"""The installer: what a package must pass before it serves, and that refusals change nothing."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.metrics import Metrics
from agent.models.registry import ROLLED_BACK, Registry
from agent.models.store import ModelStore
from agent.updates.installer import Change, Installer
from agent.wire.errors import (
    ChecksumMismatch,
    ManifestInvalid,
    PackageError,
    ParityFailed,
    ReplayedSerial,
    SignatureInvalid,
    SignatureMissing,
    StorageFull,
)
from agent.wire.package import read_manifest, write_manifest
from agent.wire.signing import generate_keypair, load_private_key, sign_manifest

Edit = Callable[[dict[str, Any]], None]


def repackage(
    package: Path, dest: Path, key: Path | None, edit: Edit | None = None, **fields: Any
) -> Path:
    """A copy of ``package`` with manifest fields changed, signed with ``key`` (or unsigned)."""
    out = dest / f"pkg-{len(list(dest.glob('pkg-*')))}"
    shutil.copytree(package, out)
    raw = read_manifest(out).unsigned_dict()
    raw.update(fields)
    if edit is not None:
        edit(raw)
    write_manifest(out, sign_manifest(raw, load_private_key(key)) if key else raw)
    return out


@pytest.fixture
def make_installer(tmp_path: Path, keypair: Any) -> Callable[..., Installer]:
    """An installer over a store in tmp_path that trusts the test keypair."""

    def make(*, trusted: bool = True, allow_unsigned: bool = False, keep: int = 3) -> Installer:
        cfg = Config(state_dir=str(tmp_path / "state"))
        cfg.models.trusted_keys = [str(keypair.pub)] if trusted else []
        cfg.models.allow_unsigned = allow_unsigned
        cfg.models.keep_versions = keep
        store = ModelStore(cfg.models_path, keep_versions=keep)
        return Installer(cfg, store, Registry(), Metrics())

    return make


def serving(installer: Installer) -> str:
    return installer.registry.get("iris").version


def test_signed_package_is_activated_and_serves(
    make_installer: Callable[..., Installer], iris_package: Path
) -> None:
    installer = make_installer()
    changes: list[Change] = []
    installer.listeners.append(changes.append)
    manifest = installer.install(iris_package)
    assert (manifest.name, manifest.version) == ("iris", "1.0.0")
    assert serving(installer) == "1.0.0"
    assert installer.registry.get("iris").path == installer.store.version_dir("iris", "1.0.0")
    assert installer.store.last_serial("iris") == 1
    assert [(c.name, c.event) for c in changes] == [("iris", "activated")]


def test_replayed_serial_is_refused_and_same_active_serial_is_a_no_op(
    make_installer: Callable[..., Installer], iris_package: Path, iris_package_v2: Path
) -> None:
    installer = make_installer()
    installer.install(iris_package)
    installer.install(iris_package_v2)
    with pytest.raises(
        ReplayedSerial, match="serial 1 for 'iris' is not above the last accepted serial 2"
    ):
        installer.install(iris_package)
    assert serving(installer) == "1.1.0"
    # The manifest already active, delivered again (a retained message on reconnect).
    assert installer.install(iris_package_v2).version == "1.1.0"
    assert serving(installer) == "1.1.0"


def test_failing_parity_leaves_the_old_model_active(
    tmp_path: Path,
    make_installer: Callable[..., Installer],
    iris_package: Path,
    keypair: Any,
) -> None:
    installer = make_installer()
    installer.install(iris_package)

    def wrong_labels(raw: dict[str, Any]) -> None:
        labels = raw["parity"]["expected"]["label"]
        labels[2] = "setosa" if labels[2] != "setosa" else "virginica"

    bad = repackage(iris_package, tmp_path, keypair.key, wrong_labels, version="2.0.0", serial=5)
    with pytest.raises(ParityFailed, match=r"iris 2\.0\.0: parity: output 'label' row 2"):
        installer.install(bad)
    assert serving(installer) == "1.0.0"
    assert installer.registry.status()["iris"]["state"] == "active"
    assert installer.store.versions("iris") == ["1.0.0"]
    assert installer.store.last_serial("iris") == 1


def test_manifest_changed_after_signing_is_refused(
    tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path
) -> None:
    installer = make_installer()
    installer.install(iris_package)
    forged = repackage(iris_package, tmp_path, None)
    signed = read_manifest(iris_package).to_dict()
    signed.update(version="9.0.0", serial=99)  # keeps the old signature
    write_manifest(forged, signed)
    with pytest.raises(SignatureInvalid, match=r"does not match manifest iris 9\.0\.0"):
        installer.install(forged)
    assert serving(installer) == "1.0.0"
    assert installer.store.last_serial("iris") == 1


def test_unsigned_package_is_refused_when_keys_are_configured(
    tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path
) -> None:
    unsigned = repackage(iris_package, tmp_path, None)
    with pytest.raises(SignatureMissing, match=r"iris 1\.0\.0: not signed"):
        make_installer().install(unsigned)
    assert make_installer(allow_unsigned=True).install(unsigned).version == "1.0.0"


def test_unsigned_package_is_accepted_without_trusted_keys(
    tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path
) -> None:
    unsigned = repackage(iris_package, tmp_path, None)
    assert make_installer(trusted=False).install(unsigned).version == "1.0.0"


def test_package_signed_by_an_unknown_key_is_refused(
    tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path
) -> None:
    other_key, _ = generate_keypair(tmp_path / "other-keys")
    foreign = repackage(iris_package, tmp_path, other_key)
    with pytest.raises(SignatureInvalid, match="is not a trusted key"):
        make_installer().install(foreign)


def test_corrupt_artifact_is_refused(
    tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path
) -> None:
    corrupt = repackage(iris_package, tmp_path, None)
    data = bytearray((corrupt / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=r"model\.onnx: sha256 is"):
        make_installer().install(corrupt)


def test_old_versions_are_pruned_to_keep_versions(
    tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path, keypair: Any
) -> None:
    installer = make_installer(keep=2)
    for serial, version in enumerate(["1.0.0", "1.1.0", "1.2.0", "1.3.0"], start=1):
        installer.install(
            repackage(iris_package, tmp_path, keypair.key, version=version, serial=serial)
        )
    assert installer.store.versions("iris") == ["1.2.0", "1.3.0"]
    assert serving(installer) == "1.3.0"


def test_rollback_activates_the_previous_version(
    make_installer: Callable[..., Installer], iris_package: Path, iris_package_v2: Path
) -> None:
    installer = make_installer()
    with pytest.raises(PackageError, match="'iris' is not installed"):
        installer.rollback("iris", reason="test")
    installer.install(iris_package)
    with pytest.raises(PackageError, match="no previous version"):
        installer.rollback("iris", reason="test")
    installer.install(iris_package_v2)
    assert installer.rollback("iris", reason="errors went up").version == "1.0.0"
    assert serving(installer) == "1.0.0"
    state = installer.registry.status()["iris"]
    assert (state["state"], state["reason"]) == (ROLLED_BACK, "errors went up")
    pointer = installer.store.active("iris")
    assert pointer is not None
    assert (pointer.version, pointer.previous, pointer.serial) == ("1.0.0", "1.1.0", 2)
    # The replaced manifest cannot come back by replay, only by a new serial.
    with pytest.raises(ReplayedSerial):
        installer.install(iris_package_v2)


def test_start_up_falls_back_to_previous_when_active_is_corrupt(
    tmp_path: Path,
    make_installer: Callable[..., Installer],
    iris_package: Path,
    iris_package_v2: Path,
) -> None:
    first = make_installer()
    first.install(iris_package)
    first.install(iris_package_v2)
    onnx = first.store.version_dir("iris", "1.1.0") / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])

    restarted = make_installer()
    assert restarted.load_all() == ["iris"]
    assert serving(restarted) == "1.0.0"
    state = restarted.registry.status()["iris"]
    assert state["state"] == ROLLED_BACK
    assert "1.1.0 cannot be loaded" in state["reason"]
    assert "model.onnx" in state["reason"]
    pointer = restarted.store.active("iris")
    assert pointer is not None
    assert pointer.version == "1.0.0"


def test_sync_picks_up_a_version_another_process_activated(
    make_installer: Callable[..., Installer], iris_package: Path, iris_package_v2: Path
) -> None:
    agent = make_installer()
    agent.install(iris_package)
    assert agent.sync() == []
    make_installer().install(iris_package_v2)  # e.g. `edge-agent install` beside the agent
    assert serving(agent) == "1.0.0"
    assert agent.sync() == ["iris"]
    assert serving(agent) == "1.1.0"


def test_updates_are_counted_by_outcome(
    tmp_path: Path, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    cfg = Config(state_dir=str(tmp_path / "state"))
    cfg.models.trusted_keys = [str(keypair.pub)]
    metrics = Metrics()
    installer = Installer(cfg, ModelStore(cfg.models_path), Registry(), metrics)
    installer.install(iris_package_v2)
    with pytest.raises(ReplayedSerial):
        installer.install(iris_package)

    def count(outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "edge_model_updates_total", {"model": "iris", "outcome": outcome}
        )

    assert (count("activated"), count("rejected")) == (1.0, 1.0)


def test_a_new_manifest_for_an_older_artifact_moves_back_to_it(
    tmp_path: Path,
    make_installer: Callable[..., Installer],
    iris_package: Path,
    iris_package_v2: Path,
    keypair: Any,
) -> None:
    """A fleet rollback: the publisher re-signs 1.0.0 with a new serial."""
    installer = make_installer()
    installer.install(iris_package)
    installer.install(iris_package_v2)
    back = repackage(iris_package, tmp_path, keypair.key, serial=3)
    assert installer.install(back, source="mqtt").serial == 3
    assert serving(installer) == "1.0.0"
    pointer = installer.store.active("iris")
    assert pointer is not None
    assert (pointer.version, pointer.previous, pointer.serial) == ("1.0.0", "1.1.0", 3)
    assert installer.store.manifest("iris", "1.0.0").serial == 3
    assert installer.store.versions("iris") == ["1.0.0", "1.1.0"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk (needs root and mount rights, else skipped)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_refuses_the_install_and_the_old_model_serves_on(
    small_disk: Path, keypair: Any, iris_package: Path, iris_package_v2: Path
) -> None:
    cfg = Config(state_dir=str(small_disk / "state"))
    cfg.models.trusted_keys = [str(keypair.pub)]
    installer = Installer(cfg, ModelStore(cfg.models_path), Registry())
    installer.install(iris_package)
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    with pytest.raises(StorageFull, match="no space left"):
        installer.install(iris_package_v2)
    assert serving(installer) == "1.0.0"
    assert installer.registry.status()["iris"]["state"] == "active"
    pointer = installer.store.active("iris")
    assert pointer is not None
    assert (pointer.version, pointer.serial) == ("1.0.0", 1)
    assert installer.store.versions("iris") == ["1.0.0"]
    assert [p.name for p in (cfg.models_path / "iris").iterdir() if p.name.startswith(".")] == []
    filler.unlink()
    assert installer.install(iris_package_v2).version == "1.1.0"


def test_sync_keeps_serving_when_the_newly_activated_version_cannot_load(
    make_installer: Callable[..., Installer], iris_package: Path, iris_package_v2: Path
) -> None:
    agent = make_installer()
    agent.install(iris_package)
    other = make_installer()
    other.install(iris_package_v2)
    onnx = other.store.version_dir("iris", "1.1.0") / "model.onnx"
    onnx.write_bytes(b"broken")
    assert agent.sync() == []
    assert serving(agent) == "1.0.0"
    state = agent.registry.status()["iris"]
    assert state["state"] == "active"
    assert state["reason"].startswith("1.1.0: model.onnx:")
    assert agent.sync() == []  # tried once per activation, not every second


def test_a_model_with_no_loadable_version_is_failed_and_others_serve(
    make_installer: Callable[..., Installer], iris_package: Path, regressor_package: Path
) -> None:
    first = make_installer()
    first.install(iris_package)
    first.install(regressor_package)
    (first.store.version_dir("iris", "1.0.0") / "model.onnx").write_bytes(b"broken")
    restarted = make_installer()
    assert restarted.load_all() == ["ridge"]
    assert restarted.registry.get().name == "ridge"
    state = restarted.registry.status()["iris"]
    assert (state["version"], state["state"]) == (None, "failed")
    assert "no previous version" not in state["reason"]
    assert "1.0.0 cannot be loaded" in state["reason"]


@pytest.mark.parametrize("name", ["..", "."])
def test_a_signed_package_named_with_dots_is_refused_and_writes_nothing(
    name: str, tmp_path: Path, make_installer: Callable[..., Installer], iris_package: Path,
    keypair: Any,
) -> None:  # fmt: skip
    installer = make_installer()
    dots = repackage(iris_package, tmp_path, keypair.key, name=name)
    with pytest.raises(ManifestInvalid, match=f"name: {re.escape(repr(name))} is not a plain name"):
        installer.install(dots)
    state = tmp_path / "state"
    assert not (state / "active.json").exists() and not (state / "1.0.0").exists()
    assert [p.name for p in installer.store.root.iterdir() if p.is_dir()] == []
