"""``edge-fleet publish``, ``rollout``, ``rollback`` and ``gc``: the desired state on the broker.

Everything lives in retained messages, so no other service keeps state:

- ``{prefix}/artifacts/{sha256}/{index}``: the artifact's chunks (QoS 1, retained).
- ``{prefix}/fleets/{F}/models/{M}/desired`` (or ``devices/{ID}/...``): the manifest,
  re-signed by the publisher with a fresh ``serial``, ``issued_at``, ``artifact.chunk_size``
  and, for a fleet, ``rollout: {percent, salt}`` INSIDE the signed body: nobody without
  the key can widen a rollout, and a device refuses an old rollout replayed.
- ``{prefix}/fleets/{F}/models/{M}/history`` (or ``devices/{ID}/...``): the unsigned
  manifests published there before, newest last (``HISTORY_KEEP`` of them), so
  ``rollback`` can re-sign an older one. Devices cannot read it (ACL) and need not.

Serials are per model name and grow across every target (a device sees both its
fleet's and its own desired state), so each new manifest takes one above every
serial retained for that model anywhere. The salt is ``{fleet}/{model}``: widening
10% -> 50% keeps the first 10% in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.wire.errors import PackageError, UsageError
from agent.wire.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Manifest,
    parse_manifest,
)
from agent.wire.names import check_name
from agent.wire.package import check_artifact, read_manifest
from agent.wire.signing import key_id, load_private_key, verify_signature

from fleet.connection import BrokerOptions, add_broker_arguments, broker_options
from fleet.retained import (
    Session,
    Target,
    artifact_retained,
    publish_desired,
    read_model_state,
    sign_desired,
    upload_artifact,
)

# --- commands ---------------------------------------------------------------------


def _name(flag: str, value: str) -> str:
    try:
        return check_name(flag, value)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _targets(fleet: str, devices: Sequence[str]) -> list[Target]:
    _name("--fleet", fleet)
    return [Target(device=_name("--device", d)) for d in devices] or [Target(fleet=fleet)]


def _check_percent(percent: float) -> float:
    if not 0 <= percent <= 100:
        raise UsageError(f"--rollout/--percent: {percent:g} is not 0..100")
    return percent


def verify_local(package: Path, key: Path) -> Manifest:
    """Manifest, artifact size and sha256; a signature by this key must hold."""
    manifest = read_manifest(package)
    check_artifact(package, manifest)
    private = load_private_key(key)
    public = private.public_key()
    sig = manifest.signature
    if sig is not None and sig.get("key_id") == key_id(public):
        verify_signature(manifest, {key_id(public): public})
    return manifest


def publish(
    options: BrokerOptions,
    package: Path,
    *,
    fleet: str,
    devices: Sequence[str] = (),
    percent: float = 100,
    key: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[dict[str, Any]]:
    """Upload the artifact (unless retained already) and set the desired state; returns
    the signed manifests published, one per target."""
    targets = _targets(fleet, devices)
    _check_percent(percent)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size: {chunk_size} is not {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    manifest = verify_local(package, key)
    art = manifest.artifact
    session = Session(options, "publish")
    try:
        state = read_model_state(session, manifest.name)
        if artifact_retained(session, art.sha256, art.size, chunk_size):
            print(f"artifact {art.sha256[:12]} is already on the broker", file=sys.stderr)
        else:
            upload_artifact(session, package / art.file, art.sha256, chunk_size)
        serial = max(state.max_serial(), manifest.serial - 1)
        out = []
        for target in targets:
            serial += 1
            signed = sign_desired(
                manifest.to_dict(),
                serial=serial,
                chunk_size=chunk_size,
                target=target,
                percent=percent,
                key=key,
            )
            publish_desired(session, target, signed, state)
            out.append(signed)
            print(f"{manifest.name} {manifest.version}: desired for {target} (serial {serial}"
                  + (f", rollout {percent:g}%" if "rollout" in signed else "") + ")")  # fmt: skip
        return out
    finally:
        session.close()


def rollout(
    options: BrokerOptions, model: str, *, fleet: str, percent: float, key: Path
) -> dict[str, Any]:
    """Re-sign the fleet's desired manifest with a new percent (and a new serial)."""
    _check_percent(percent)
    target = Target(fleet=_name("--fleet", fleet))
    session = Session(options, "rollout")
    try:
        state = read_model_state(session, _name("MODEL", model))
        current = state.desired.get(target.desired(session.topics, model))
        if current is None:
            raise PackageError(f"{model}: nothing is published for fleet {fleet}; publish first")
        chunk_size = int(current["artifact"].get("chunk_size", DEFAULT_CHUNK_SIZE))
        signed = sign_desired(
            current,
            serial=state.max_serial() + 1,
            chunk_size=chunk_size,
            target=target,
            percent=percent,
            key=key,
        )
        publish_desired(session, target, signed, state)
        print(f"{model} {signed['version']}: rollout {percent:g}% for fleet {fleet} "
              f"(serial {signed['serial']})")  # fmt: skip
        return signed
    finally:
        session.close()


def rollback(
    options: BrokerOptions,
    model: str,
    *,
    fleet: str,
    key: Path,
    to: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """A new manifest (higher serial, 100%) naming an older artifact from the history."""
    target = Target(device=_name("--device", device)) if device else Target(fleet=fleet)
    _name("--fleet", fleet)
    session = Session(options, "rollback")
    try:
        state = read_model_state(session, _name("MODEL", model))
        current = state.desired.get(target.desired(session.topics, model))
        history = state.history.get(target.history(session.topics, model), [])
        if current is None:
            raise PackageError(f"{model}: nothing is published for {target}; nothing to roll back")
        now = current["version"]
        picks = [e for e in history if (e.get("version") == to if to else e.get("version") != now)]
        if not picks:
            known = sorted({str(e.get("version")) for e in history}) or ["none"]
            want = f"version {to}" if to else f"a version other than {now}"
            raise PackageError(
                f"{model}: no {want} in the history of {target} (published: {', '.join(known)})"
            )
        entry = picks[-1]
        old = parse_manifest(entry)  # validates the history entry before re-signing it
        chunk_size = old.artifact.chunk_size
        if not artifact_retained(session, old.artifact.sha256, old.artifact.size, chunk_size):
            raise PackageError(
                f"{model} {old.version}: its artifact {old.artifact.sha256[:12]} is no longer "
                "on the broker (cleared by gc?); publish that package again instead"
            )
        signed = sign_desired(
            entry,
            serial=state.max_serial() + 1,
            chunk_size=chunk_size,
            target=target,
            percent=100,
            key=key,
        )
        publish_desired(session, target, signed, state)
        print(f"{model}: rolled back to {old.version} for {target} (serial {signed['serial']}"
              f", from {now})")  # fmt: skip
        return signed
    finally:
        session.close()


def gc(options: BrokerOptions, *, dry_run: bool = False) -> list[str]:
    """Clear retained artifacts that no desired manifest and no history entry names."""
    t = options.topics
    session = Session(options, "gc")
    try:
        refs = session.read_retained([
            t.fleet_desired("+", "+"), t.device_desired("+", "+"),
            t.fleet_desired("+", "+").rsplit("/", 1)[0] + "/history",
            t.device_desired("+", "+").rsplit("/", 1)[0] + "/history",
        ])  # fmt: skip
        keep: set[str] = set()
        for payload in refs.values():
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            entries = data.get("entries", []) if isinstance(data, dict) else []
            for m in [data, *entries] if isinstance(data, dict) else []:
                sha = m.get("artifact", {}).get("sha256") if isinstance(m, dict) else None
                if isinstance(sha, str):
                    keep.add(sha)
        chunks = session.read_retained([f"{t.prefix}/artifacts/#"], timeout=60)
        drop = sorted(topic for topic in chunks if topic.split("/")[-2] not in keep)
        artifacts = sorted({topic.split("/")[-2] for topic in drop})
        if not dry_run:
            session.wait([session.publish(topic, b"") for topic in drop], "clearing chunks")
        verb = "would clear" if dry_run else "cleared"
        print(f"{verb} {len(artifacts)} artifacts ({len(drop)} chunks); kept {len(keep)}")
        return artifacts
    finally:
        session.close()


# --- CLI --------------------------------------------------------------------------


def _key_argument(parser: argparse.ArgumentParser) -> None:
    # Not --key: that is the broker's client-certificate key (fleet/connection.py).
    env = os.environ.get("EDGE_SIGNING_KEY")
    parser.add_argument(
        "--signing-key",
        "--publisher-key",
        dest="signing_key",
        metavar="PATH",
        required=not env,
        default=Path(env) if env else None,
        type=Path,
        help="the publisher's ed25519 private key (edge-model keygen) [$EDGE_SIGNING_KEY]",
    )


def add_parser(sub: Any) -> list[argparse.ArgumentParser]:
    p = sub.add_parser("publish", help="upload a model package and set it as desired")
    p.add_argument("package", type=Path, help="package folder (model.onnx + manifest.json)")
    p.add_argument("--fleet", required=True)
    p.add_argument("--device", action="append", default=[], metavar="ID",
                   help="only these devices (repeatable); overrides the fleet's desired state")  # fmt: skip
    p.add_argument("--rollout", type=float, default=100.0, metavar="PERCENT",
                   help="staged rollout: the share of the fleet that takes it (default 100)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"artifact chunk size (default {DEFAULT_CHUNK_SIZE}; below the broker's packet limit)")  # fmt: skip
    _key_argument(p)
    add_broker_arguments(p)
    p.set_defaults(func=lambda a: _run(a, lambda o: publish(
        o, a.package, fleet=a.fleet, devices=a.device, percent=a.rollout, key=a.signing_key,
        chunk_size=a.chunk_size)))  # fmt: skip

    r = sub.add_parser("rollout", help="widen or narrow a staged rollout")
    r.add_argument("model")
    r.add_argument("--fleet", required=True)
    r.add_argument("--percent", type=float, required=True)
    _key_argument(r)
    add_broker_arguments(r)
    r.set_defaults(func=lambda a: _run(a, lambda o: rollout(
        o, a.model, fleet=a.fleet, percent=a.percent, key=a.signing_key)))  # fmt: skip

    b = sub.add_parser("rollback", help="set an older published version as desired again")
    b.add_argument("model")
    b.add_argument("--fleet", required=True)
    b.add_argument("--to", metavar="VERSION", help="default: the version published before")
    b.add_argument("--device", metavar="ID", help="roll back one device's own desired state")
    _key_argument(b)
    add_broker_arguments(b)
    b.set_defaults(func=lambda a: _run(a, lambda o: rollback(
        o, a.model, fleet=a.fleet, key=a.signing_key, to=a.to, device=a.device)))  # fmt: skip

    g = sub.add_parser("gc", help="clear retained artifacts no desired state or history names")
    g.add_argument("--dry-run", action="store_true", help="only say what would be cleared")
    add_broker_arguments(g)
    g.set_defaults(func=lambda a: _run(a, lambda o: gc(o, dry_run=a.dry_run)))
    return [p, r, b, g]


def _run(args: argparse.Namespace, action: Any) -> int:
    action(broker_options(args))
    return 0
