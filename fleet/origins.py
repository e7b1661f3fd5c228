"""HTTP(S) origins of an artifact for ``edge-fleet publish``: ``--artifact-url``, ``--upload-dir``.

The URLs go into the signed manifest (``artifact.urls``, tried by devices in order);
``{sha256}`` in a URL stands for the artifact's sha256, so one template serves every
release of a folder laid out by ``--upload-dir`` (``DIR/{sha256}``). With URLs the
broker carries the manifest only, unless ``--broker-chunks`` uploads the chunks too
as the devices' fallback (``artifact.broker_chunks`` says which).

``edge-fleet gc --upload-dir DIR`` removes ``DIR/{sha256}`` files no retained desired
state or history entry names (``collect_upload_dir``). Only names of 64 lowercase hex
digits that are plain files are candidates; anything else in DIR (an index page,
another tool's files, a copy under way) is left alone and listed as skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from agent.wire.errors import EdgeError, ManifestInvalid, UsageError
from agent.wire.manifest import check_artifact_urls

from fleet.report import Report

SHA256_NAME = re.compile(r"[0-9a-f]{64}")
# A file younger than this may be the copy of a publish that has not yet retained its
# desired state (publish copies first): gc keeps it.
UPLOAD_MIN_AGE_S = 3600.0


class UploadDirUnclean(EdgeError):
    """Files gc meant to remove from --upload-dir are still there."""


def origin_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact-url", action="append", default=[], metavar="URL",
                   help="an http(s) URL devices download the artifact from, tried in order "
                        "(repeatable; {sha256} is replaced by the artifact's sha256)")  # fmt: skip
    p.add_argument("--upload-dir", type=Path, metavar="DIR",
                   help="copy the artifact to DIR/{sha256} first, for a web server serving "
                        "DIR (needs --artifact-url)")  # fmt: skip
    p.add_argument("--broker-chunks", action="store_true",
                   help="with --artifact-url: upload broker chunks too, the devices' fallback")  # fmt: skip


def artifact_urls(templates: Sequence[str], sha256: str, upload_dir: Path | None) -> list[str]:
    """The URLs for this artifact, checked by the manifest's own rule; UsageError if bad."""
    if upload_dir is not None and not templates:
        raise UsageError("--upload-dir: needs --artifact-url (where devices download it from)")
    urls = [t.replace("{sha256}", sha256) for t in templates]
    if not urls:
        return []
    try:
        check_artifact_urls(urls)
    except ManifestInvalid as e:
        raise UsageError(f"--artifact-url: {e}") from None
    return urls


def upload(artifact: Path, folder: Path, sha256: str, report: Report) -> Path:
    """Copy ``artifact`` to ``folder/{sha256}`` atomically: a web server never serves a
    half-written file under the name devices ask for."""
    if not folder.is_dir():
        raise UsageError(f"--upload-dir: {folder} is not a folder")
    target = folder / sha256
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{sha256[:12]}.")
    try:
        with artifact.open("rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the web server's user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)  # the new name survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    report.say(f"artifact {sha256[:12]} copied to {target}")
    return target


def with_origins(body: dict[str, Any], urls: Sequence[str], broker_chunks: bool) -> dict[str, Any]:
    """``body`` with ``artifact.urls``/``broker_chunks`` as this publish makes them true."""
    art = {k: v for k, v in body["artifact"].items() if k not in {"urls", "broker_chunks"}}
    if urls:
        art["urls"] = list(urls)
        if not broker_chunks:
            art["broker_chunks"] = False
    return {**body, "artifact": art}


# --- gc of an upload folder ------------------------------------------------------------


def gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upload-dir", type=Path, metavar="DIR",
                   help="also remove DIR/{sha256} files (publish --upload-dir) that no "
                        "desired state or history names")  # fmt: skip
    p.add_argument("--upload-min-age", type=float, default=UPLOAD_MIN_AGE_S, metavar="S",
                   help="with --upload-dir: keep files modified less than S seconds ago, a "
                        f"publish may be under way (default {UPLOAD_MIN_AGE_S:g})")  # fmt: skip


def collect_upload_dir(
    folder: Path,
    needed: Collection[str],
    *,
    dry_run: bool,
    report: Report,
    min_age_s: float = UPLOAD_MIN_AGE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Remove ``folder/{sha256}`` files whose sha256 is not in ``needed``; every other
    entry is skipped and said. Facts go into ``report.facts`` under ``upload_dir*``."""
    if not folder.is_dir():
        raise UsageError(f"--upload-dir: {folder} is not a folder")
    if min_age_s < 0:
        raise UsageError(f"--upload-min-age: {min_age_s:g} is below 0")
    now = time.time() if now is None else now
    remove: list[tuple[str, int]] = []
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        name = entry.name
        if not SHA256_NAME.fullmatch(name):
            skipped.append({"name": name, "reason": "not a sha256 name"})
            continue
        info = entry.lstat()
        if not stat.S_ISREG(info.st_mode):  # a link or a folder is someone's set-up
            skipped.append({"name": name, "reason": "not a plain file"})
        elif name in needed:
            kept.append(name)
        elif now - info.st_mtime < min_age_s:
            age = max(now - info.st_mtime, 0.0)
            skipped.append({"name": name, "reason": f"modified {age:.0f} s ago, under "
                            f"--upload-min-age {min_age_s:g} s (a publish under way?)"})  # fmt: skip
        else:
            remove.append((name, info.st_size))
    failed: list[str] = []
    if not needed and remove:
        # Nothing retained names any artifact: more likely the wrong broker or prefix
        # than a folder nobody needs. Removing would empty an origin devices use.
        report.warn(f"--upload-dir {folder}: no desired state or history is retained on this "
                    f"broker (wrong --broker or --topic-prefix?): removing none of its "
                    f"{len(remove)} artifacts")  # fmt: skip
        skipped += [{"name": n, "reason": "nothing retained names any artifact"} for n, _ in remove]
        remove = []
    if not dry_run:
        for name, _size in remove:
            try:
                (folder / name).unlink()
            except FileNotFoundError:
                pass  # gone already: what gc wanted
            except OSError as e:
                failed.append(name)
                report.warn(f"--upload-dir: cannot remove {folder / name}: {e.strerror or e}")
    removed = [(n, size) for n, size in remove if n not in failed]
    verb = "would remove" if dry_run else "removed"
    freed = sum(size for _, size in removed)
    report.say(f"{folder}: {verb} {len(removed)} artifacts ({freed} bytes); kept {len(kept)}"
               + (f"; skipped {len(skipped)}" if skipped else ""))  # fmt: skip
    for s in skipped:
        report.note(f"  skipped {s['name']}: {s['reason']}")
    report.facts.update(
        upload_dir=str(folder),
        upload_dir_removed=[n for n, _ in removed],
        upload_dir_bytes_removed=freed,
        upload_dir_kept=kept,
        upload_dir_skipped=skipped,
        upload_dir_failed=failed,
    )
    if failed:
        raise UploadDirUnclean(f"--upload-dir: {len(failed)} of {len(remove)} artifacts could "
                               f"not be removed from {folder} (first: {failed[0]})")  # fmt: skip
    return report.facts
