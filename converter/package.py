"""Build a model package: convert, check parity, write ``model.onnx`` + ``manifest.json``, sign.

The manifest fields are described in docs/package-format.md; the device side
(agent/runtime.py, agent/installer.py) relies on every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from agent.wire.errors import ConversionError, ManifestInvalid
from agent.wire.manifest import (
    DEFAULT_CHUNK_SIZE,
    MANIFEST_FILE,
    MODEL_FILE,
    Artifact,
    parse_manifest,
)
from agent.wire.names import name_problem, parse_version
from agent.wire.package import write_artifact, write_manifest
from agent.wire.signing import sign_manifest
from agent.wire.times import rfc3339
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converter.convert import check_fitted, convert, json_values, task_of
from converter.parity import (
    ParityResult,
    compare,
    excusable_rows,
    raise_on_failure,
    run_sklearn,
)
from converter.profiling import sample_profile
from converter.schema import (
    Batch,
    InputSchema,
    generate_batch,
    infer_schema,
    onnx_feeds,
    read_sample,
    sample_batch,
    take_rows,
)

GENERATED_ROWS = 256
STORED_ROWS = 12
_LABEL_TASKS = {"classifier", "cluster", "outlier"}


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: dict[str, Any]
    parity: ParityResult
    size: int


def build_package(
    estimator: Any,
    *,
    name: str,
    version: str,
    out_dir: Path,
    sample: Any = None,
    private_key: Ed25519PrivateKey | None = None,
    serial: int = 1,
) -> Path:
    """Convert, parity-check, write and (with a key) sign a package; return its folder."""
    return build(
        estimator,
        name=name,
        version=version,
        out_dir=out_dir,
        sample=sample,
        private_key=private_key,
        serial=serial,
    ).path


def build(
    estimator: Any,
    *,
    name: str,
    version: str,
    out_dir: Path,
    sample: Any = None,
    private_key: Ed25519PrivateKey | None = None,
    serial: int = 1,
    opset: dict[str, int] | None = None,
    double: bool = False,
) -> BuildResult:
    """Like build_package, returning the manifest and parity figures for a report."""
    problem = name_problem("name", name)
    if problem is not None:
        raise ManifestInvalid(problem)
    parse_version(version)
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise ManifestInvalid(f"serial: {serial!r}, expected a non-negative integer")
    check_fitted(estimator)
    if isinstance(sample, str | Path):
        sample = read_sample(Path(sample))
    schema = infer_schema(estimator, sample, double=double)
    batch = (
        sample_batch(schema, sample)
        if sample is not None
        else generate_batch(estimator, schema, GENERATED_ROWS)
    )
    if schema.rows(batch) == 0:
        raise ConversionError("sample: no rows")
    task = task_of(estimator)
    converted = convert(estimator, schema, opset)
    # skl2onnx names the graph with a random uuid; the package name makes builds
    # reproducible, so an unchanged model keeps its sha256 (and its retained chunks).
    converted.model.graph.name = name
    session = _session(converted.model)
    names = [o.name for o in converted.outputs]
    exact = ["label"] if task in _LABEL_TASKS and "label" in names else []

    expected, ties = run_sklearn(estimator, task, schema, batch, names)
    actual = _run(session, schema, batch, names)
    result = compare(expected, actual, exact=exact, skip=ties)
    excused = excusable_rows(result, estimator, task, schema, batch)
    if excused.any():
        result = compare(expected, actual, exact=exact, skip=ties | excused)
        result.ties, result.sensitive = int(ties.sum()), int(excused.sum())
    raise_on_failure(result, schema, batch)
    parity = _stored_parity(
        estimator, task, schema, batch, session=session, names=names, exact=exact, checked=result
    )

    model_bytes = converted.model.SerializeToString()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_artifact(out_dir, MODEL_FILE, model_bytes)
    import hashlib

    artifact = Artifact(MODEL_FILE, len(model_bytes), hashlib.sha256(model_bytes).hexdigest())
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "serial": serial,
        "issued_at": rfc3339(),
        "artifact": {
            "file": artifact.file,
            "size": artifact.size,
            "sha256": artifact.sha256,
            "chunk_size": DEFAULT_CHUNK_SIZE,
            "chunks": artifact.chunks,
        },
        "inputs": [spec.to_dict() for spec in schema.inputs],
        "outputs": [spec.to_dict() for spec in converted.outputs],
        "task": task,
        "prediction_output": "label" if "label" in names else names[0],
        "runtime": _runtime(converted.model),
        "parity": parity,
        "converter": {
            "estimator": _describe(estimator),
            "checked_rows": result.rows,
            "near_ties_skipped": result.ties,
            "float32_sensitive_skipped": result.sensitive,
            "max_abs_diff": {d.name: d.max_abs for d in result.outputs.values() if not d.exact},
            "sample": "given" if sample is not None else "generated",
        },
    }
    if task == "classifier" and "probabilities" in expected:
        manifest["probabilities_output"] = "probabilities"
    if schema.feature_names is not None:
        manifest["feature_names"] = schema.feature_names
    classes = getattr(estimator, "classes_", None)
    if classes is not None and task == "classifier":
        manifest["classes"] = json_values(classes)
    if sample is not None:
        labels = manifest.get("classes") if task == "classifier" else None
        manifest["profile"] = sample_profile(
            schema, batch, actual, manifest["prediction_output"], labels
        )
    if private_key is not None:
        manifest = sign_manifest(manifest, private_key)
    parse_manifest(manifest)  # the device's own validation, before anything ships
    write_manifest(out_dir, manifest)
    # The atomic writes' temp files are 0600; a package is meant to be read by others
    # (the agent's user, edge-fleet, a web server), and holds nothing secret.
    for written in (out_dir / MODEL_FILE, out_dir / MANIFEST_FILE):
        written.chmod(0o644)
    return BuildResult(out_dir, manifest, result, artifact.size)


def _session(model: Any) -> Any:
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ConversionError(f"model: onnxruntime cannot load the converted graph: {e}") from e


def _run(session: Any, schema: InputSchema, batch: Batch, names: list[str]) -> dict[str, Any]:
    values = session.run(names, onnx_feeds(schema, batch))
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def _stored_parity(
    estimator: Any,
    task: str,
    schema: InputSchema,
    batch: Batch,
    *,
    session: Any,
    names: list[str],
    exact: list[str],
    checked: ParityResult,
) -> dict[str, Any]:
    """A handful of passing, non-tie rows, rounded to what the device will feed."""
    good = np.flatnonzero(~checked.failed_rows & ~checked.skipped_rows)
    candidates = take_rows(batch, good[: STORED_ROWS * 3])
    for spec in schema.inputs:
        if spec.datatype == "FP32":
            candidates[spec.name] = candidates[spec.name].astype(np.float32).astype(np.float64)
    expected, ties = run_sklearn(estimator, task, schema, candidates, names)
    actual = _run(session, schema, candidates, names)
    again = compare(expected, actual, exact=exact, skip=ties)
    keep = np.flatnonzero(~again.failed_rows & ~ties)[:STORED_ROWS]
    if keep.size == 0:
        raise ConversionError(
            "parity: no row is clear of near ties to store for the device's own check; "
            "give a --sample with typical rows"
        )
    return {
        "inputs": {n: json_values(v[keep]) for n, v in candidates.items()},
        "expected": {n: json_values(v[keep]) for n, v in again.expected.items()},
        "exact": exact,
        "rtol": checked.rtol,
        "atol": checked.atol,
    }


def _runtime(model: Any) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    return {
        "opset": {op.domain or "ai.onnx": int(op.version) for op in model.opset_import},
        "onnxruntime": onnxruntime.__version__,
        "sklearn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
    }


def _describe(estimator: Any) -> str:
    steps = getattr(estimator, "steps", None)
    if steps:
        return "Pipeline(" + ", ".join(type(s).__name__ for _, s in steps) + ")"
    return type(estimator).__name__
