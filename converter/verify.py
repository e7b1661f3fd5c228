"""Check a package as the device will: manifest, artifact hash, signature, parity vectors."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelLoadFailed, ParityFailed
from agent.manifest import (
    Manifest,
    check_artifact,
    load_trusted_keys,
    open_package,
    read_manifest,
    verify_signature,
)
from converter.parity import compare

_NUMPY_TYPES: dict[str, Any] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
    "BYTES": object,
}


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    key_id: str | None  # the key that signed it, None when no key was given
    parity_rows: int


def verify(package: Path, pubs: Sequence[Path] = ()) -> Verified:
    """Raise a PackageError subclass naming what is wrong; with ``pubs`` a signature is required."""
    with tempfile.TemporaryDirectory(prefix="edge-model-") as scratch:
        folder = open_package(package, Path(scratch))
        manifest = read_manifest(folder)
        check_artifact(folder, manifest)
        trusted = load_trusted_keys(pubs)
        kid = verify_signature(manifest, trusted, require=bool(pubs))
        rows = replay_parity(folder, manifest)
    return Verified(manifest, kid, rows)


def replay_parity(folder: Path, manifest: Manifest) -> int:
    """Run the manifest's parity inputs through onnxruntime; the rows checked."""
    import onnxruntime

    parity = manifest.parity
    if not parity:
        raise ParityFailed("parity: the manifest has no parity block to check the model with")
    try:
        feeds = {
            spec.name: np.asarray(parity["inputs"][spec.name], dtype=_NUMPY_TYPES[spec.datatype])
            for spec in manifest.inputs
        }
        expected = {k: np.asarray(v) for k, v in parity["expected"].items()}
        exact = list(parity.get("exact", []))
        rtol, atol = float(parity["rtol"]), float(parity["atol"])
    except (KeyError, TypeError, ValueError) as e:
        raise ParityFailed(f"parity: malformed block ({type(e).__name__}: {e})") from None
    names = list(expected)
    try:
        session = onnxruntime.InferenceSession(
            str(folder / manifest.artifact.file), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime's own Fail/InvalidGraph/... types
        raise ModelLoadFailed(f"{manifest.artifact.file}: onnxruntime cannot load it ({e})") from e
    try:
        actual = dict(zip(names, session.run(names, feeds), strict=True))
    except Exception as e:
        raise ParityFailed(f"parity: running the stored inputs failed ({e})") from e
    rows = int(next(iter(feeds.values())).shape[0])
    result = compare(
        expected, actual, exact=exact, skip=np.zeros(rows, dtype=bool), rtol=rtol, atol=atol
    )
    if not result.ok:
        bad = [f"{d.name} ({d.detail})" for d in result.outputs.values() if d.mismatches]
        raise ParityFailed(
            f"parity: onnxruntime {onnxruntime.__version__} disagrees with the manifest's "
            f"expected outputs: {'; '.join(bad)}"
        )
    return rows
