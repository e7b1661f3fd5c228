"""ed25519 keys and manifest signatures.

A signature covers the canonical JSON (``canonical_json``) of the manifest without its
``signature`` field; the key id is the first 16 hex digits of the sha256 of the raw
public key, so a device can name the key it was given and the one it was shown.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.wire.errors import KeyFileError, SignatureInvalid, SignatureMissing
from agent.wire.manifest import Manifest, canonical_json


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
