"""The shared package format: canonical JSON, signatures, versions, validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from agent.wire.errors import ManifestInvalid, SignatureInvalid, SignatureMissing
from agent.wire.manifest import canonical_json, parse_manifest
from agent.wire.names import parse_version
from agent.wire.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    load_trusted_keys,
    sign_manifest,
    verify_signature,
)


def minimal_manifest() -> dict[str, Any]:
    return {
        "name": "iris",
        "version": "1.2.0",
        "serial": 3,
        "issued_at": "2026-11-24T12:00:00Z",
        "artifact": {"file": "model.onnx", "size": 10, "sha256": "a" * 64},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
    }


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": "ø"}) == '{"a":"ø","b":1}'.encode()


def test_versions_compare_numerically() -> None:
    assert parse_version("1.10.0") > parse_version("1.9.3")
    with pytest.raises(ManifestInvalid, match="version"):
        parse_version("1.x")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("name",), "bad name", "name"),
        (("serial",), "7", "serial: expected int"),
        (("artifact", "sha256"), "xyz", "artifact.sha256"),
        (("artifact", "file"), "../etc/passwd", "artifact.file"),
        (("inputs",), [], "inputs"),
        (("issued_at",), "yesterday", "issued_at"),
    ],
)
def test_invalid_fields_are_named(path: tuple[str, ...], value: Any, message: str) -> None:
    m = minimal_manifest()
    target = m
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(m)


def test_not_json_is_refused() -> None:
    with pytest.raises(ManifestInvalid, match="not valid JSON"):
        parse_manifest(b"{nope")


def test_sign_and_verify_round_trip(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path)
    assert key_path.stat().st_mode & 0o777 == 0o600
    signed = sign_manifest(minimal_manifest(), load_private_key(key_path))
    trusted = load_trusted_keys([pub_path])
    kid = verify_signature(parse_manifest(json.dumps(signed)), trusted)
    assert kid == signed["signature"]["key_id"]
    assert load_public_key(pub_path) is not None


def test_any_changed_field_breaks_the_signature(tmp_path: Path) -> None:
    key_path, pub_path = generate_keypair(tmp_path)
    signed = sign_manifest(minimal_manifest(), load_private_key(key_path))
    tampered = copy.deepcopy(signed)
    tampered["artifact"]["size"] = 11
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify_signature(parse_manifest(tampered), load_trusted_keys([pub_path]))


def test_unknown_key_and_missing_signature(tmp_path: Path) -> None:
    key_path, _ = generate_keypair(tmp_path / "a")
    _, other_pub = generate_keypair(tmp_path / "b")
    signed = parse_manifest(sign_manifest(minimal_manifest(), load_private_key(key_path)))
    with pytest.raises(SignatureInvalid, match="not a trusted key"):
        verify_signature(signed, load_trusted_keys([other_pub]))
    with pytest.raises(SignatureMissing):
        verify_signature(parse_manifest(minimal_manifest()), {}, require=True)
    assert verify_signature(parse_manifest(minimal_manifest()), {}, require=False) is None


@pytest.mark.parametrize("name", ["..", ".", ".lock", "...", "a/b", "", "iris/../x"])
def test_a_name_is_one_plain_path_component(name: str) -> None:
    from agent.wire.manifest import parse_manifest

    body = {
        "name": name, "version": "1.0.0", "serial": 1, "issued_at": "2026-01-01T00:00:00Z",
        "artifact": {"file": "model.onnx", "size": 1, "sha256": "a" * 64},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }  # fmt: skip
    with pytest.raises(ManifestInvalid, match="is not a plain name"):
        parse_manifest(body)


def test_the_store_builds_no_path_outside_itself(tmp_path: Path) -> None:
    from agent.models.store import ModelStore

    store = ModelStore(tmp_path / "models")
    for name in ("..", ".", "../x"):
        with pytest.raises(ManifestInvalid):
            store.version_dir(name, "1.0.0")
        with pytest.raises(ManifestInvalid):
            store.active(name)
    with pytest.raises(ManifestInvalid):
        store.version_dir("iris", "../../etc")
