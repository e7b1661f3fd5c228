"""``artifact.urls`` and ``artifact.broker_chunks``: the artifact's sources, signed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.wire.errors import ManifestInvalid, SignatureInvalid
from agent.wire.manifest import parse_manifest
from agent.wire.signing import generate_keypair, load_private_key, sign_manifest, verify_signature
from tests.agent.wire.test_manifest import minimal_manifest

URL = "https://origin.example/artifacts/" + "a" * 64


def with_artifact(**fields: Any) -> dict[str, Any]:
    m = minimal_manifest()
    m["artifact"].update(fields)
    return m


def test_an_old_manifest_means_broker_chunks_and_no_urls() -> None:
    art = parse_manifest(minimal_manifest()).artifact
    assert (art.urls, art.broker_chunks) == ((), True)


def test_urls_are_kept_in_order_with_or_without_chunks() -> None:
    second = "http://10.0.0.5:8080/a.onnx"
    art = parse_manifest(with_artifact(urls=[URL, second], broker_chunks=False)).artifact
    assert (art.urls, art.broker_chunks) == ((URL, second), False)
    assert parse_manifest(with_artifact(urls=[URL])).artifact.broker_chunks is True


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ([], r"artifact.urls: expected a list of 1..8"),
        ([URL] * 9, r"artifact.urls: expected a list of 1..8"),
        (URL, r"artifact.urls: expected a list"),
        ([URL, "ftp://origin.example/a"], r"artifact.urls\[1\]: expected an http:// or https://"),
        ([URL, 7], r"artifact.urls\[1\]: .* got 7"),
        (["https://"], r"artifact.urls\[0\]"),
        (["http://host/has space"], r"artifact.urls\[0\]"),
    ],
)
def test_a_bad_url_list_names_the_entry(urls: Any, message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(with_artifact(urls=urls))


def test_broker_chunks_must_be_a_boolean_and_leave_a_source() -> None:
    with pytest.raises(ManifestInvalid, match=r"artifact\.broker_chunks: expected true/false"):
        parse_manifest(with_artifact(urls=[URL], broker_chunks="no"))
    with pytest.raises(ManifestInvalid, match=r"no artifact\.urls: no source left"):
        parse_manifest(with_artifact(broker_chunks=False))


def test_the_urls_are_covered_by_the_signature(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path)
    private = load_private_key(key)
    public = private.public_key()
    signed = sign_manifest(with_artifact(urls=[URL], broker_chunks=False), private)
    kid = signed["signature"]["key_id"]
    verify_signature(parse_manifest(signed), {kid: public})
    signed["artifact"]["urls"] = ["https://evil.example/a.onnx"]
    with pytest.raises(SignatureInvalid):
        verify_signature(parse_manifest(signed), {kid: public})
