"""``edge-model``: convert, keygen, sign, verify, inspect.

Exit codes: 0 success, 1 a failure explained in one line on stderr (a traceback only
with ``--verbose``), 2 bad usage. Every command is thin: it parses, calls one function
of converter/ or agent/manifest.py, and prints what happened.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.wire.errors import KeyFileError, ManifestInvalid, run_command
from agent.wire.manifest import MODEL_FILE
from agent.wire.package import check_artifact, read_manifest, write_manifest
from agent.wire.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
)

from converter.loading import UNPICKLE_WARNING

PROG = "edge-model"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of a failure",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a fitted scikit-learn model into a signed ONNX model package.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser(
        "convert",
        parents=[common],
        help="convert a joblib/pickle/skops model into a package",
        description="Convert MODEL, check parity between scikit-learn and onnxruntime, "
        f"write OUTDIR/model.onnx and OUTDIR/manifest.json. WARNING: {UNPICKLE_WARNING}.",
    )
    convert.add_argument("model", type=Path, metavar="MODEL", help=".joblib, .pkl or .skops file")
    convert.add_argument(
        "--name",
        required=True,
        help="model name (letters, digits, _ - and ., not starting with a dot)",
    )
    convert.add_argument("--version", required=True, help="dotted numbers, e.g. 1.2.0")
    convert.add_argument(
        "--sample", type=Path, help="CSV with a header row, or .npy: rows to check parity on"
    )
    convert.add_argument("--key", type=Path, help="ed25519 private key to sign with")
    convert.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    convert.add_argument("--serial", type=int, default=1, help="manifest serial (default 1)")
    convert.add_argument(
        "--double",
        action="store_true",
        help="float64 inputs and graph, for large-magnitude features float32 rounds",
    )
    convert.add_argument(
        "--trust", action="append", default=[], metavar="TYPE", help="trust a type in a .skops file"
    )

    keygen = sub.add_parser("keygen", parents=[common], help="write an ed25519 key pair")
    keygen.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")

    sign = sub.add_parser("sign", parents=[common], help="(re)sign a package's manifest")
    sign.add_argument("package", type=Path, metavar="PACKAGE")
    sign.add_argument("--key", type=Path, required=True, help="ed25519 private key")
    sign.add_argument("--serial", type=int, help="set a new serial before signing")

    verify = sub.add_parser(
        "verify", parents=[common], help="check hash, signature and parity vectors"
    )
    verify.add_argument("package", type=Path, metavar="PACKAGE", help="folder or .tar")
    verify.add_argument(
        "--pub",
        type=Path,
        action="append",
        default=[],
        help="trusted public key (repeatable); with it the signature is required",
    )

    inspect = sub.add_parser("inspect", parents=[common], help="show what a package holds")
    inspect.add_argument("package", type=Path, metavar="PACKAGE", help="folder or .tar")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2)
        return int(e.code or 0)
    verbose = bool(getattr(args, "verbose", False))
    with warnings.catch_warnings():
        # scikit-learn and skl2onnx warnings are noise here; failures are errors.
        warnings.simplefilter("ignore")
        return run_command(PROG, lambda: _COMMANDS[args.command](args), verbose=verbose)


# --- commands ---------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    from converter.loading import load_estimator
    from converter.package import build

    private = load_private_key(args.key) if args.key is not None else None
    estimator = load_estimator(args.model, trust=args.trust)
    result = build(
        estimator,
        name=args.name,
        version=args.version,
        out_dir=args.output,
        sample=args.sample,
        private_key=private,
        serial=args.serial,
        double=args.double,
    )
    m = result.manifest
    signed = f"signed by key {m['signature']['key_id']}" if "signature" in m else "unsigned"
    print(f"wrote {result.path} ({MODEL_FILE} {result.size} bytes, {signed})")
    _print_tensors(m)
    source = "sample" if args.sample is not None else "generated"
    print(
        f"parity:  {result.parity.summary()} ({source} rows; tolerance atol "
        f"{result.parity.atol:g} + rtol {result.parity.rtol:g}); "
        f"{len(next(iter(m['parity']['inputs'].values())))} rows stored for the device"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    out: Path = args.output
    for name in ("publisher.key", "publisher.pub"):
        if (out / name).exists() and not args.force:
            raise KeyFileError(f"{out / name}: exists; refusing to overwrite a key (--force)")
    key, pub = generate_keypair(out)
    print(f"wrote {key} (private, mode 0600) and {pub}; key id {key_id(load_public_key(pub))}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    folder: Path = args.package
    if not folder.is_dir():
        raise ManifestInvalid(f"{folder}: sign works on a package folder")
    private = load_private_key(args.key)
    manifest = read_manifest(folder)
    # Never vouch for an artifact that does not match its manifest.
    check_artifact(folder, manifest)
    body = manifest.unsigned_dict()
    if args.serial is not None:
        if args.serial < 0:
            raise ManifestInvalid(f"serial: {args.serial}, expected a non-negative integer")
        body["serial"] = args.serial
    signed = sign_manifest(body, private)
    write_manifest(folder, signed)
    print(
        f"signed {manifest.name} {manifest.version} serial {signed['serial']} "
        f"with key {signed['signature']['key_id']}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from converter.verify import verify

    result = verify(args.package, args.pub)
    m = result.manifest
    sig = (
        f"signature valid (key {result.key_id})"
        if result.key_id
        else "signature NOT checked (give --pub)"
        if m.signature
        else "unsigned"
    )
    print(
        f"ok: {m.name} {m.version} serial {m.serial}: sha256 matches, {sig}, "
        f"{result.parity_rows} parity rows reproduced"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import tempfile

    from agent.wire.package import open_package

    with tempfile.TemporaryDirectory(prefix="edge-model-") as scratch:
        m = read_manifest(open_package(args.package, Path(scratch)))
    raw = m.to_dict()
    if args.json:
        print(json.dumps(raw, indent=2, sort_keys=True))
        return 0
    print(f"{m.name} {m.version} (serial {m.serial}, issued {m.issued_at})")
    print(f"task:    {raw.get('task', '?')}, answers with {m.prediction_output!r}")
    _print_tensors(raw)
    art = m.artifact
    print(f"model:   {art.file} {art.size} bytes, sha256 {art.sha256}, {art.chunks} chunk(s)")
    runtime = raw.get("runtime", {})
    print(
        f"runtime: opset {runtime.get('opset')}, onnxruntime {runtime.get('onnxruntime')}, "
        f"scikit-learn {runtime.get('sklearn')}, skl2onnx {runtime.get('skl2onnx')}"
    )
    sig = m.signature
    print(f"signed:  key {sig.get('key_id')}" if sig else "signed:  no")
    return 0


def _print_tensors(manifest: dict[str, Any]) -> None:
    def show(specs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{s['name']} {s['datatype']} {s['shape']}" for s in specs)

    print(f"inputs:  {show(manifest['inputs'])}")
    print(f"outputs: {show(manifest['outputs'])}")
    if manifest.get("feature_names"):
        print(f"features: {', '.join(map(str, manifest['feature_names']))}")
    if manifest.get("classes") is not None:
        print(f"classes: {', '.join(map(str, manifest['classes']))}")
    profile = manifest.get("profile")
    if isinstance(profile, dict):
        print(
            f"profile: {len(profile.get('features', []))} feature(s) of {profile.get('rows')} "
            "sample rows, for the device's drift scores"
        )
    else:
        print("profile: none (give --sample to let devices report drift)")


_COMMANDS = {
    "convert": _convert,
    "keygen": _keygen,
    "sign": _sign,
    "verify": _verify,
    "inspect": _inspect,
}
