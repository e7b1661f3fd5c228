"""``edge-fleet publish``, ``rollout``, ``rollback`` and ``gc``: the desired state on the broker.

Everything lives in retained messages, so no other service keeps state:

- ``{prefix}/artifacts/{sha256}/{index}``: the artifact's chunks (QoS 1, retained), one
  chunk size per artifact whatever fleet it goes to (``fleet/artifacts.py``).
- ``{prefix}/fleets/{F}/models/{M}/desired`` (or ``devices/{ID}/...``): the manifest,
  re-signed by the publisher with a fresh ``serial``, ``issued_at``, ``artifact.chunk_size``
  and, for a fleet, ``rollout: {percent, salt, where?}`` INSIDE the signed body: nobody
  without the key can widen a rollout, and a device refuses an old rollout replayed.
- ``{prefix}/fleets/{F}/models/{M}/history`` (or ``devices/{ID}/...``): the unsigned
  manifests published there before, newest last (``HISTORY_KEEP`` of them), so
  ``rollback`` can re-sign an older one. Devices cannot read it (ACL) and need not.

Serials are per model name and grow across every target (a device sees both its
fleet's and its own desired state), so each new manifest takes one above every
serial retained for that model anywhere. The salt is ``{fleet}/{model}``: widening
10% -> 50% keeps the first 10% in. Before anything is sent, ``fleet/targets.py`` checks
that someone is there to receive it (``--strict`` refuses otherwise).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.wire.errors import PackageError, UsageError
from agent.wire.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Manifest,
    canary_traffic_problem,
    parse_manifest,
)
from agent.wire.names import check_name
from agent.wire.package import check_artifact, open_package, read_manifest
from agent.wire.signing import key_id, load_private_key, verify_signature

from fleet.artifacts import chunk_size_for, collect, ensure_artifact, retained_layout
from fleet.connection import BrokerOptions, add_broker_arguments
from fleet.origins import (
    UPLOAD_MIN_AGE_S,
    artifact_urls,
    collect_upload_dir,
    gc_arguments,
    origin_arguments,
    upload,
    with_origins,
)
from fleet.report import Report, output_arguments, run_reported
from fleet.retained import Session, Target, publish_desired, read_model_state, sign_desired
from fleet.targets import check_targets, check_trust, parse_where, read_known, where_argument

# --- arguments --------------------------------------------------------------------


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


def _where_text(where: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((where or {}).items()))


def _signing_key_id(key: Path) -> str:
    return key_id(load_private_key(key).public_key())


def verify_local(package: Path, key: Path, report: Report | None = None) -> Manifest:
    """Manifest, artifact size and sha256; a signature by this key must hold.

    A package signed by another key (a data scientist's, a former publisher's) is
    re-signed with ``key``: said out loud, since the devices judge the new signature."""
    manifest = read_manifest(package)
    check_artifact(package, manifest)
    public = load_private_key(key).public_key()
    sig = manifest.signature
    if sig is not None and sig.get("key_id") == key_id(public):
        verify_signature(manifest, {key_id(public): public})
    elif sig is not None and report is not None:
        report.warn(f"package signed by key {sig.get('key_id')}; re-signing with {key_id(public)}")
    return manifest


def _desired_line(model: str, version: str, target: Target, signed: dict[str, Any]) -> str:
    tail = ""
    if "rollout" in signed:
        rollout = signed["rollout"]
        where = _where_text(rollout.get("where"))
        tail = f", rollout {rollout['percent']:g}%" + (f" where {where}" if where else "")
    if signed.get("shadow"):
        tail += ", in shadow: installed beside the active version, compared, not served"
    if signed.get("canary_traffic") is not None:
        tail += f", canary: serves {signed['canary_traffic']:g}% beside the active version"
    return f"{model} {version}: desired for {target} (serial {signed['serial']}{tail})"


def _published(target: Target, topic: str, signed: dict[str, Any]) -> dict[str, Any]:
    return {
        "fleet": target.fleet,
        "device": target.device,
        "topic": topic,
        "version": signed["version"],
        "serial": signed["serial"],
        "rollout": signed.get("rollout"),
        "shadow": bool(signed.get("shadow")),
        "canary_traffic": signed.get("canary_traffic"),
    }


# --- commands ---------------------------------------------------------------------


def publish(
    options: BrokerOptions,
    package: Path,
    *,
    fleet: str,
    devices: Sequence[str] = (),
    percent: float = 100,
    key: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    where: Mapping[str, str] | None = None,
    strict: bool = False,
    urls: Sequence[str] = (),
    upload_dir: Path | None = None,
    broker_chunks: bool = False,
    shadow: bool = False,
    canary_traffic: float | None = None,
    report: Report | None = None,
) -> list[dict[str, Any]]:
    """Upload the artifact (unless retained already, or ``urls`` serve it without
    ``broker_chunks``) and set the desired state; returns the signed manifests
    published, one per target. ``package``: a folder or a .tar."""
    report = report or Report()
    targets = _targets(fleet, devices)
    _check_percent(percent)
    if canary_traffic == 100:
        canary_traffic = None  # 100%: a plain install, the candidate becomes the only version
    if (problem := canary_traffic_problem(canary_traffic)) is not None:
        raise UsageError(f"--canary-traffic: {problem} (100 or no flag: serve it alone)")
    if shadow and canary_traffic is not None:
        raise UsageError("--canary-traffic: a --shadow candidate serves no traffic; give one")
    if where and devices:
        raise UsageError("--where: selects devices of a fleet; a --device publish names them")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"--chunk-size: {chunk_size} is not {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    kid = _signing_key_id(key)
    with tempfile.TemporaryDirectory(prefix="edge-fleet-package-") as scratch:
        folder = open_package(package, Path(scratch))
        manifest = verify_local(folder, key, report)
        art = manifest.artifact
        origins = artifact_urls(urls, art.sha256, upload_dir)
        chunks = broker_chunks or not origins
        if upload_dir is not None:  # before any device hears of it
            upload(folder / art.file, upload_dir, art.sha256, report)
        session = Session(options, "publish")
        try:
            known = read_known(session)
            check_targets(known, fleet=fleet, devices=devices, where=where, strict=strict,
                          report=report)  # fmt: skip
            check_trust(known, kid, fleet=fleet, devices=devices, where=where, strict=strict,
                        report=report)  # fmt: skip
            state = read_model_state(session, manifest.name)
            uploaded = False
            if chunks:
                chunk_size, uploaded = ensure_artifact(session, folder / art.file, art.sha256,
                                                       art.size, wanted=chunk_size, report=report)  # fmt: skip
            body = with_origins(manifest.to_dict(), origins, chunks)
            # Signed: a device tells a shadow from a rollout by the publisher's word only.
            body.pop("shadow", None)
            body.pop("canary_traffic", None)
            if shadow:
                body["shadow"] = True
            if canary_traffic is not None:
                body["canary_traffic"] = canary_traffic
            serial = max(state.max_serial(), manifest.serial - 1)
            out, published = [], []
            for target in targets:
                serial += 1
                signed = sign_desired(body, serial=serial, chunk_size=chunk_size,
                                      target=target, percent=percent, key=key, where=where)  # fmt: skip
                publish_desired(session, target, signed, state)
                out.append(signed)
                published.append(_published(target, target.desired(session.topics, manifest.name),
                                            signed))  # fmt: skip
                report.say(_desired_line(manifest.name, manifest.version, target, signed))
        finally:
            session.close()
    report.facts.update(
        model=manifest.name,
        version=manifest.version,
        sha256=art.sha256,
        size=art.size,
        chunk_size=chunk_size,
        chunks=out[0]["artifact"]["chunks"],
        uploaded=uploaded,
        urls=origins,
        broker_chunks=chunks,
        signing_key=kid,
        package_key=(manifest.signature or {}).get("key_id"),
        published=published,
    )
    return out


def rollout(
    options: BrokerOptions,
    model: str,
    *,
    fleet: str,
    percent: float,
    key: Path,
    where: Mapping[str, str] | None = None,
    strict: bool = False,
    promote: bool = False,
    report: Report | None = None,
) -> dict[str, Any]:
    """Re-sign the fleet's desired manifest with a new percent (and a new serial);
    ``promote`` drops its ``shadow`` flag, so a candidate compared in shadow serves.

    ``where`` None keeps the manifest's tag selection, ``{}`` drops it, otherwise it
    replaces it. Used by ``edge-fleet rollout --percent`` and by the rollout driver."""
    report = report or Report()
    _check_percent(percent)
    target = Target(fleet=_name("--fleet", fleet))
    kid = _signing_key_id(key)
    session = Session(options, "rollout")
    try:
        state = read_model_state(session, _name("MODEL", model))
        topic = target.desired(session.topics, model)
        current = state.desired.get(topic)
        if current is None:
            raise PackageError(f"{model}: nothing is published for fleet {fleet}; publish first")
        if where is None:
            where = dict((current.get("rollout") or {}).get("where") or {})
        known = read_known(session)
        check_targets(known, fleet=fleet, where=where, strict=strict, report=report)
        check_trust(known, kid, fleet=fleet, where=where, strict=strict, report=report)
        old_kid = (current.get("signature") or {}).get("key_id")
        if old_kid and old_kid != kid:
            report.warn(f"desired state signed by key {old_kid}; re-signing with {kid}")
        art = current["artifact"]
        chunk_size = int(art.get("chunk_size", DEFAULT_CHUNK_SIZE))
        # A manifest from before chunk sizes were fixed may name a size the chunks no
        # longer have: re-signing takes the retained one, which repairs it.
        fixed = chunk_size_for(retained_layout(session, art["sha256"], int(art["size"])),
                               chunk_size, int(art["size"]))  # fmt: skip
        if fixed != chunk_size:
            report.warn(f"{model}: the desired manifest said chunks of {chunk_size} bytes, the "
                        f"broker holds chunks of {fixed}: re-signed with {fixed}")  # fmt: skip
        if promote:
            current = {k: v for k, v in current.items() if k != "shadow"}
        signed = sign_desired(current, serial=state.max_serial() + 1, chunk_size=fixed,
                              target=target, percent=percent, key=key, where=where)  # fmt: skip
        publish_desired(session, target, signed, state)
        report.say(_desired_line(model, signed["version"], target, signed))
        report.facts.update(model=model, published=[_published(target, topic, signed)])
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
    report: Report | None = None,
) -> dict[str, Any]:
    """A new manifest (higher serial, 100%) naming an older artifact from the history.

    After ``unpublish`` (no desired state, the history kept) the version unpublished
    counts as the current one: rollback goes to the one before it, ``--to`` to any."""
    report = report or Report()
    target = Target(fleet=_name("--fleet", fleet))
    session = Session(options, "rollback")
    try:
        state = read_model_state(session, _name("MODEL", model))
        topic = target.desired(session.topics, model)
        current = state.desired.get(topic)
        history = state.history.get(target.history(session.topics, model), [])
        if current is None and not history:
            raise PackageError(f"{model}: nothing is published for {target}; nothing to roll back")
        now = (current or history[-1]).get("version")
        picks = [e for e in history if (e.get("version") == to if to else e.get("version") != now)]
        if not picks:
            known = sorted({str(e.get("version")) for e in history}) or ["none"]
            want = f"version {to}" if to else f"version other than {now}"
            raise PackageError(
                f"{model}: no {want} in the history of {target} (published: {', '.join(known)})"
            )
        entry = picks[-1]
        old = parse_manifest(entry)  # validates the history entry before re-signing it
        layout = retained_layout(session, old.artifact.sha256, old.artifact.size)
        if old.artifact.broker_chunks and (layout is None or not layout.complete):
            raise PackageError(
                f"{model} {old.version}: its artifact {old.artifact.sha256[:12]} is no longer "
                "on the broker (cleared by gc?); publish that package again instead"
            )
        chunk_size = chunk_size_for(layout, old.artifact.chunk_size, old.artifact.size)
        signed = sign_desired(entry, serial=state.max_serial() + 1, chunk_size=chunk_size,
                              target=target, percent=100, key=key)  # fmt: skip
        publish_desired(session, target, signed, state)
        gone = "" if current else ", which was unpublished"
        report.say(f"{model}: rolled back to {old.version} for {target} (serial "
                   f"{signed['serial']}, from {now}{gone})")  # fmt: skip
        report.facts.update(model=model, from_version=now,
                            published=[_published(target, topic, signed)])  # fmt: skip
        return signed
    finally:
        session.close()


def gc(
    options: BrokerOptions,
    *,
    dry_run: bool = False,
    upload_dir: Path | None = None,
    upload_min_age_s: float = UPLOAD_MIN_AGE_S,
    report: Report | None = None,
) -> list[str]:
    """Clear retained chunks no desired manifest or history entry needs, and with
    ``upload_dir`` the ``{sha256}`` files there that none needs; returns the artifacts
    cleared whole from the broker."""
    report = report or Report()
    if upload_dir is not None and not upload_dir.is_dir():  # before touching the broker
        raise UsageError(f"--upload-dir: {upload_dir} is not a folder")
    session = Session(options, "gc")
    try:
        facts = collect(session, dry_run=dry_run, report=report)
    finally:
        session.close()
    if upload_dir is not None:
        collect_upload_dir(upload_dir, set(facts["artifacts_kept"]), dry_run=dry_run,
                           report=report, min_age_s=upload_min_age_s)  # fmt: skip
    return list(facts["artifacts_cleared"])


# --- CLI --------------------------------------------------------------------------


def key_argument(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--signing-key`` (``$EDGE_SIGNING_KEY``). Not --key: that is the broker's
    client-certificate key (fleet/connection.py)."""
    env = os.environ.get("EDGE_SIGNING_KEY")
    parser.add_argument(
        "--signing-key",
        "--publisher-key",
        dest="signing_key",
        metavar="PATH",
        required=required and not env,
        default=Path(env) if env else None,
        type=Path,
        help="the publisher's ed25519 private key (edge-model keygen) [$EDGE_SIGNING_KEY]",
    )


def _rollback_command(a: argparse.Namespace, o: BrokerOptions, report: Report) -> Any:
    if a.device:
        from fleet.commands import rollback_device

        return rollback_device(o, a.model, device=a.device, fleet=a.fleet, to=a.to,
                               reason=a.reason, timeout=a.timeout, report=report)  # fmt: skip
    if not a.fleet:
        raise UsageError("rollback: give --fleet (re-sign an older version) or --device")
    if a.signing_key is None:
        raise UsageError("--signing-key: required to re-sign the fleet's desired state")
    return rollback(o, a.model, fleet=a.fleet, key=a.signing_key, to=a.to, report=report)


def add_parser(sub: Any) -> list[argparse.ArgumentParser]:
    p = sub.add_parser("publish", help="upload a model package and set it as desired")
    p.add_argument("package", type=Path, help="package folder or .tar (.tar.gz) of one")
    p.add_argument("--fleet", required=True)
    p.add_argument("--device", action="append", default=[], metavar="ID",
                   help="only these devices (repeatable); overrides the fleet's desired state")  # fmt: skip
    p.add_argument("--rollout", type=float, default=100.0, metavar="PERCENT",
                   help="staged rollout: the share of the fleet that takes it (default 100)")  # fmt: skip
    where_argument(p)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"artifact chunk size (default {DEFAULT_CHUNK_SIZE}; below the broker's "
                        "packet limit; an artifact already on the broker keeps its own)")  # fmt: skip
    p.add_argument("--shadow", action="store_true",
                   help="install it beside the active version and compare it on a sample of "
                        "live requests, without serving it (see `edge-fleet shadow-report`)")  # fmt: skip
    p.add_argument("--canary-traffic", type=float, metavar="PERCENT",
                   help="serve it to PERCENT (0 < p < 100) of each device's requests beside "
                        "the active version, sticky by the X-Edge-Key header; publishing "
                        "again without it (or with 100) makes it the only version")  # fmt: skip
    origin_arguments(p)
    key_argument(p)
    output_arguments(p, strict=True)
    add_broker_arguments(p)
    p.set_defaults(func=lambda a: run_reported(a, lambda o, r: publish(
        o, a.package, fleet=a.fleet, devices=a.device, percent=a.rollout, key=a.signing_key,
        chunk_size=a.chunk_size, where=parse_where(a.where), strict=a.strict, urls=a.artifact_url,
        upload_dir=a.upload_dir, broker_chunks=a.broker_chunks, shadow=a.shadow,
        canary_traffic=a.canary_traffic, report=r)))  # fmt: skip

    b = sub.add_parser("rollback", help="set an older version as desired again, or roll one "
                                        "device back at once (--device)")  # fmt: skip
    b.add_argument("model")
    b.add_argument("--fleet", help="re-sign an older version from this fleet's history")
    b.add_argument("--to", metavar="VERSION", help="default: the version published before")
    b.add_argument("--device", metavar="ID",
                   help="send the device the rollback command and wait for its answer")  # fmt: skip
    b.add_argument("--reason", help="with --device: the reason the device records")
    b.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="with --device: seconds to wait for the answer (default 30)")  # fmt: skip
    key_argument(b, required=False)
    output_arguments(b)
    add_broker_arguments(b)
    b.set_defaults(func=lambda a: run_reported(a, lambda o, rep: _rollback_command(a, o, rep)))

    g = sub.add_parser(
        "gc", help="clear retained artifact chunks (and --upload-dir files) no desired state "
                   "or history needs"
    )  # fmt: skip
    g.add_argument("--dry-run", action="store_true", help="only say what would be cleared")
    gc_arguments(g)
    output_arguments(g)
    add_broker_arguments(g)
    g.set_defaults(func=lambda a: run_reported(a, lambda o, r: gc(
        o, dry_run=a.dry_run, upload_dir=a.upload_dir, upload_min_age_s=a.upload_min_age,
        report=r)))  # fmt: skip
    return [p, b, g]
