"""The model package format and its signature: the one wire module all parts share.

A package is a folder (or a ``.tar`` of it) with ``model.onnx`` and ``manifest.json``.
The manifest is signed with ed25519 over its canonical JSON without ``signature``.
``converter/`` writes packages, ``fleet/`` re-signs and publishes them, ``agent/``
verifies them; all three use this module so that none of them re-implements it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import (
    ChecksumMismatch,
    KeyFileError,
    ManifestInvalid,
    SignatureInvalid,
    SignatureMissing,
    SizeMismatch,
)

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
DEFAULT_CHUNK_SIZE = 256 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DATATYPES = {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}


# --- canonical form and versions --------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a signature covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_version(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``; versions compare numerically, not as text."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ManifestInvalid(f"version: {version!r} is not dotted numbers like 1.2.0")
    return tuple(int(p) for p in version.split("."))


def utc_now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


# --- the manifest -----------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Artifact:
    file: str
    size: int
    sha256: str
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. ``raw`` keeps every field, known or not."""

    name: str
    version: str
    serial: int
    issued_at: str
    artifact: Artifact
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return parse_version(self.version)

    @property
    def signature(self) -> dict[str, Any] | None:
        sig = self.raw.get("signature")
        return sig if isinstance(sig, dict) else None

    @property
    def parity(self) -> dict[str, Any]:
        p = self.raw.get("parity")
        return p if isinstance(p, dict) else {}

    @property
    def classes(self) -> list[Any] | None:
        c = self.raw.get("classes")
        return c if isinstance(c, list) else None

    @property
    def feature_names(self) -> list[str] | None:
        f = self.raw.get("feature_names")
        return f if isinstance(f, list) else None

    @property
    def prediction_output(self) -> str:
        """Which output ``/predict`` answers with (``label`` for classifiers)."""
        value = self.raw.get("prediction_output")
        return value if isinstance(value, str) else self.outputs[0].name

    @property
    def probabilities_output(self) -> str | None:
        value = self.raw.get("probabilities_output")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)

    def unsigned_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.raw.items() if k != "signature"}


def _need(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ManifestInvalid(f"{where}{key}: missing")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestInvalid(f"{where}{key}: expected {names}, got {value!r:.60}")
    return value


def _tensor_specs(d: Mapping[str, Any], key: str) -> list[TensorSpec]:
    items = _need(d, key, list, "")
    if not items:
        raise ManifestInvalid(f"{key}: expected at least one tensor")
    specs = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]."
        if not isinstance(item, dict):
            raise ManifestInvalid(f"{key}[{i}]: expected an object")
        name = _need(item, "name", str, where)
        datatype = _need(item, "datatype", str, where)
        if datatype not in DATATYPES:
            raise ManifestInvalid(
                f"{where}datatype: {datatype!r} is not one of {sorted(DATATYPES)}"
            )
        shape = _need(item, "shape", list, where)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise ManifestInvalid(f"{where}shape: expected a list of integers, got {shape!r}")
        specs.append(TensorSpec(name, datatype, list(shape)))
    return specs


def parse_manifest(data: bytes | str | Mapping[str, Any]) -> Manifest:
    """Parse and validate a manifest; raises ManifestInvalid naming the field."""
    if isinstance(data, bytes | str):
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestInvalid(f"manifest: not valid JSON ({e})") from None
    else:
        obj = dict(data)
    if not isinstance(obj, dict):
        raise ManifestInvalid("manifest: expected a JSON object")
    name = _need(obj, "name", str, "")
    if not NAME_RE.match(name):
        raise ManifestInvalid(f"name: {name!r} must match [A-Za-z0-9_.-]+")
    version = _need(obj, "version", str, "")
    parse_version(version)
    serial = _need(obj, "serial", int, "")
    if serial < 0:
        raise ManifestInvalid(f"serial: {serial} must not be negative")
    issued_at = _need(obj, "issued_at", str, "")
    try:
        datetime.fromisoformat(issued_at.replace("Z", "+00:00"))
    except ValueError:
        raise ManifestInvalid(f"issued_at: {issued_at!r} is not an RFC 3339 time") from None
    art = _need(obj, "artifact", dict, "")
    file = _need(art, "file", str, "artifact.")
    if "/" in file or file in {"", ".", ".."}:
        raise ManifestInvalid(f"artifact.file: {file!r} must be a plain file name")
    size = _need(art, "size", int, "artifact.")
    digest = _need(art, "sha256", str, "artifact.")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ManifestInvalid(f"artifact.sha256: {digest!r} is not 64 lowercase hex digits")
    chunk_size = art.get("chunk_size", DEFAULT_CHUNK_SIZE)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ManifestInvalid(
            f"artifact.chunk_size: expected a positive integer, got {chunk_size!r}"
        )
    artifact = Artifact(file, size, digest, chunk_size)
    if "chunks" in art and art["chunks"] != artifact.chunks:
        raise ManifestInvalid(
            f"artifact.chunks: {art['chunks']!r} does not match size/chunk_size ({artifact.chunks})"
        )
    return Manifest(
        name=name,
        version=version,
        serial=serial,
        issued_at=issued_at,
        artifact=artifact,
        inputs=_tensor_specs(obj, "inputs"),
        outputs=_tensor_specs(obj, "outputs"),
        raw=obj,
    )


# --- keys and signatures ----------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write ``publisher.key`` (PKCS#8 PEM, mode 0600) and ``publisher.pub`` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = out_dir / "publisher.key", out_dir / "publisher.pub"
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"private key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"private key {path}: not an unencrypted PEM private key ({e})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path}: not an ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"public key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyFileError(f"public key {path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path}: not an ed25519 key")
    return key


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        k = load_public_key(p)
        keys[key_id(k)] = k
    return keys


def sign_manifest(manifest: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``manifest`` with a fresh ``signature`` over its canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    value = private_key.sign(canonical_json(body))
    body["signature"] = {
        "alg": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "value": base64.b64encode(value).decode(),
    }
    return body


def verify_signature(
    manifest: Manifest, trusted: Mapping[str, Ed25519PublicKey], *, require: bool = True
) -> str | None:
    """Check the manifest's signature against trusted keys; return the key id used.

    With no trusted keys and ``require=False`` an unsigned manifest passes (returns None);
    a signature that is present is still checked when its key is known.
    """
    sig = manifest.signature
    if sig is None:
        if require:
            raise SignatureMissing(f"manifest {manifest.name} {manifest.version}: not signed")
        return None
    if sig.get("alg") != "ed25519":
        raise SignatureInvalid(f"signature.alg: {sig.get('alg')!r}, expected 'ed25519'")
    kid = sig.get("key_id")
    key = trusted.get(kid) if isinstance(kid, str) else None
    if key is None:
        if not require and not trusted:
            return None
        raise SignatureInvalid(
            f"signature.key_id: {kid!r} is not a trusted key (trusted: {sorted(trusted) or 'none'})"
        )
    try:
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
        key.verify(value, canonical_json(manifest.unsigned_dict()))
    except (InvalidSignature, ValueError):
        raise SignatureInvalid(
            f"signature: does not match manifest {manifest.name} {manifest.version} "
            f"(key {kid}); the manifest was changed after signing or signed by another key"
        ) from None
    return kid


# --- packages on disk -------------------------------------------------------------


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            tar.extractall(scratch, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise ManifestInvalid(f"{path}: not a package folder or readable .tar ({e})") from None
    if (scratch / MANIFEST_FILE).exists():
        return scratch
    subdirs = [p for p in scratch.iterdir() if (p / MANIFEST_FILE).exists()]
    if len(subdirs) != 1:
        raise ManifestInvalid(f"{path}: the .tar holds no manifest.json")
    return subdirs[0]
