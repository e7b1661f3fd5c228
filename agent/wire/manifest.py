"""The model manifest: what a device needs to trust and use a model, parsed and checked.

A package is a folder (or a ``.tar`` of it) with ``model.onnx`` and ``manifest.json``
(``agent/wire/package.py``); the manifest is signed with ed25519 over its canonical
JSON without ``signature`` (``agent/wire/signing.py``). ``converter/`` writes
manifests, ``fleet/`` re-signs and publishes them, ``agent/`` verifies them; all three
parse them here, so none of them re-implements a rule.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from agent.wire.datatypes import DATATYPES
from agent.wire.errors import ManifestInvalid
from agent.wire.names import name_problem, parse_version
from agent.wire.profile import Profile, check_profile
from agent.wire.times import parse_rfc3339

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
# Artifact chunks on the broker: 50 chunks for a 50 MB forest. The largest chunk stays
# under broker-config's max_packet_size (4 MiB) with room for the PUBLISH header.
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024 - 4096
MIN_CHUNK_SIZE = 64
# artifact.urls: HTTP(S) origins of the artifact file, tried in order by the device.
MAX_URLS = 8


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a signature covers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks an artifact of ``size`` bytes takes (at least one, the last shorter)."""
    return max(1, -(-size // chunk_size))


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
    # HTTP(S) origins of the file, in the order a device tries them; () = none.
    urls: tuple[str, ...] = ()
    # False when the publisher uploaded no chunks (absent in old manifests: chunks).
    broker_chunks: bool = True

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk ``index``: ``chunk_size``, the last one shorter."""
        if index == self.chunks - 1:
            return self.size - index * self.chunk_size
        return self.chunk_size


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

    # Read on every request: computed once per manifest (cached_property writes the
    # instance dict directly, which a frozen dataclass allows).
    @cached_property
    def prediction_output(self) -> str:
        """Which output ``/predict`` answers with (``label`` for classifiers)."""
        value = self.raw.get("prediction_output")
        return value if isinstance(value, str) else self.outputs[0].name

    @cached_property
    def probabilities_output(self) -> str | None:
        value = self.raw.get("probabilities_output")
        return value if isinstance(value, str) else None

    @property
    def shadow(self) -> bool:
        """A desired state published with ``--shadow``: install beside the active version
        and compare, never serve (signed with the rest, so nobody turns it into a rollout)."""
        return self.raw.get("shadow") is True

    @property
    def canary_traffic(self) -> float | None:
        """The percent of requests (0 < p < 100) a desired state published with
        ``--canary-traffic`` serves with this version beside the active one; None: all."""
        value = self.raw.get("canary_traffic")
        return float(value) if value is not None else None

    @cached_property
    def profile(self) -> Profile | None:
        """The training sample's reference profile (``agent/wire/profile.py``), or None:
        older manifests and packages built without ``--sample`` have none."""
        if self.raw.get("profile") is None:
            return None
        return check_profile(self.raw["profile"], _input_shapes(self.inputs))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)

    def unsigned_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.raw.items() if k != "signature"}


def _input_shapes(inputs: list[TensorSpec]) -> dict[str, tuple[str, list[int]]]:
    return {spec.name: (spec.datatype, spec.shape) for spec in inputs}


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


def check_artifact_urls(urls: Any) -> tuple[str, ...]:
    """``artifact.urls`` checked: 1..MAX_URLS http(s) URLs; ManifestInvalid names the bad one."""
    if not isinstance(urls, list) or not 1 <= len(urls) <= MAX_URLS:
        raise ManifestInvalid(
            f"artifact.urls: expected a list of 1..{MAX_URLS} http(s) URLs, got {urls!r:.80}"
        )
    for i, url in enumerate(urls):
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^/\s?#]+\S*", url, re.I):
            raise ManifestInvalid(
                f"artifact.urls[{i}]: expected an http:// or https:// URL, got {url!r:.80}"
            )
    return tuple(urls)


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
    problem = name_problem("name", name)
    if problem is not None:
        raise ManifestInvalid(problem)
    version = _need(obj, "version", str, "")
    parse_version(version)
    serial = _need(obj, "serial", int, "")
    if serial < 0:
        raise ManifestInvalid(f"serial: {serial} must not be negative")
    issued_at = _need(obj, "issued_at", str, "")
    try:
        parse_rfc3339(issued_at)
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
    broker_chunks = art.get("broker_chunks", True)
    if not isinstance(broker_chunks, bool):
        raise ManifestInvalid(f"artifact.broker_chunks: expected true/false, got {broker_chunks!r}")
    urls = check_artifact_urls(art["urls"]) if "urls" in art else ()
    if not broker_chunks and not urls:
        raise ManifestInvalid("artifact.broker_chunks: false, but no artifact.urls: no source left")
    artifact = Artifact(file, size, digest, chunk_size, urls, broker_chunks)
    if "chunks" in art and art["chunks"] != artifact.chunks:
        raise ManifestInvalid(
            f"artifact.chunks: {art['chunks']!r} does not match size/chunk_size ({artifact.chunks})"
        )
    manifest = Manifest(
        name=name,
        version=version,
        serial=serial,
        issued_at=issued_at,
        artifact=artifact,
        inputs=_tensor_specs(obj, "inputs"),
        outputs=_tensor_specs(obj, "outputs"),
        raw=obj,
    )
    if not isinstance(obj.get("shadow", False), bool):
        raise ManifestInvalid(f"shadow: expected true or false, got {obj['shadow']!r:.60}")
    if (problem := canary_traffic_problem(obj.get("canary_traffic"))) is not None:
        raise ManifestInvalid(f"canary_traffic: {problem}")
    if obj.get("shadow") is True and obj.get("canary_traffic") is not None:
        raise ManifestInvalid(
            "canary_traffic: a shadow candidate serves no traffic (one or the other)"
        )
    # Optional (older manifests have none); checked now so a bad one is refused with
    # the rest of the manifest, not found later by the drift loop.
    profile = manifest.profile
    outputs = {o.name for o in manifest.outputs}
    if profile is not None and profile.output is not None and profile.output.name not in outputs:
        raise ManifestInvalid(
            f"profile.output.name: {profile.output.name!r} is not one of the manifest's "
            f"outputs {sorted(outputs)}"
        )
    return manifest


def canary_traffic_problem(value: Any) -> str | None:
    """What is wrong with a ``canary_traffic`` value (None: absent or fine): a percent
    strictly between 0 and 100 (0 would be a shadow, 100 a plain install)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        return f"expected a percent 0 < p < 100, got {value!r:.60}"
    return None
