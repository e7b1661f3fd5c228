"""Model packages on disk: a folder (or a ``.tar`` of one) with the artifact and
``manifest.json``; reading, writing and checking them as every side does."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.disk import atomic_write, sha256_file
from agent.wire.errors import ChecksumMismatch, ManifestInvalid, SizeMismatch
from agent.wire.manifest import MANIFEST_FILE, Manifest, parse_manifest
from agent.wire.signing import verify_signature


def read_manifest(package_dir: Path) -> Manifest:
    path = package_dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestInvalid(f"{path}: no manifest.json in the package") from None
    return parse_manifest(data)


def write_manifest(package_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Write manifest.json atomically (temp file, fsync, rename)."""
    data = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    atomic_write(package_dir / MANIFEST_FILE, data)


def write_artifact(package_dir: Path, name: str, data: bytes) -> Path:
    """Write a package's artifact atomically (a crash never leaves half a model)."""
    path = package_dir / name
    atomic_write(path, data)
    return path


def check_artifact(package_dir: Path, manifest: Manifest) -> Path:
    """Size and sha256 of the package's artifact against the manifest."""
    path = package_dir / manifest.artifact.file
    if not path.is_file():
        raise ManifestInvalid(
            f"artifact.file: {manifest.artifact.file} is missing from the package"
        )
    size = path.stat().st_size
    if size != manifest.artifact.size:
        raise SizeMismatch(manifest.artifact.file, manifest.artifact.size, size)
    digest = sha256_file(path)
    if digest != manifest.artifact.sha256:
        raise ChecksumMismatch(manifest.artifact.file, manifest.artifact.sha256, digest)
    return path


def verify_package(
    package_dir: Path, trusted: Mapping[str, Ed25519PublicKey], *, require_signature: bool
) -> Manifest:
    """Manifest validity, artifact size and hash, and signature. Parity is the runtime's job."""
    manifest = read_manifest(package_dir)
    check_artifact(package_dir, manifest)
    verify_signature(manifest, trusted, require=require_signature)
    return manifest


def open_package(path: Path, scratch: Path) -> Path:
    """Return a folder holding the package: ``path`` itself, or a ``.tar`` unpacked into scratch."""
    if path.is_dir():
        return path
    if not path.exists():
        raise ManifestInvalid(f"{path}: no such package (expected a folder or a .tar)")
    try:
        with tarfile.open(path) as tar:
            _unpack(tar, scratch, path)
    except (tarfile.TarError, OSError) as e:
        raise ManifestInvalid(f"{path}: not a package folder or readable .tar ({e})") from None
    if (scratch / MANIFEST_FILE).exists():
        return scratch
    subdirs = [p for p in scratch.iterdir() if (p / MANIFEST_FILE).exists()]
    if len(subdirs) != 1:
        raise ManifestInvalid(f"{path}: the .tar holds no manifest.json")
    return subdirs[0]


def _unpack(tar: tarfile.TarFile, scratch: Path, path: Path) -> None:
    """Regular files and folders only, each inside ``scratch``.

    Done by hand rather than with ``extractall(filter="data")``: Debian bookworm's
    Python 3.11.2 (Raspberry Pi OS too) has no ``filter`` argument, and a package needs
    no links, devices or modes of its own.
    """
    root = scratch.resolve()
    for member in tar.getmembers():
        parts = Path(member.name).parts
        target = (scratch / member.name).resolve()
        if Path(member.name).is_absolute() or ".." in parts or not target.is_relative_to(root):
            raise ManifestInvalid(f"{path}: member {member.name!r} would land outside the package")
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if not member.isfile():
            raise ManifestInvalid(
                f"{path}: member {member.name!r} is not a plain file (links and devices have no "
                "place in a package)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has one
        with source, target.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
