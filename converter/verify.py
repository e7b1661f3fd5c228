"""Check a package as the device will: manifest, artifact hash, signature, schema and
parity vectors, each by the device's own code in ``agent.wire``."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.wire import parity
from agent.wire.errors import ModelLoadFailed
from agent.wire.manifest import Manifest
from agent.wire.package import check_artifact, open_package, read_manifest
from agent.wire.parity import one_line
from agent.wire.signing import load_trusted_keys, verify_signature


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
    """Judge the model as the device does (``agent.wire.parity``); the rows checked.

    The schema check comes first: a package with tensors the agent does not serve
    (FP16, say) fails here just as the device would refuse it.
    """
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(
            str(folder / manifest.artifact.file), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime's own Fail/InvalidGraph/... types
        raise ModelLoadFailed(
            f"{manifest.artifact.file}: onnxruntime cannot load it ({one_line(e)})"
        ) from None
    parity.check_session(manifest, session)
    return parity.check_parity(manifest, parity.runner(session))
