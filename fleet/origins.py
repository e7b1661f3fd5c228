"""HTTP(S) origins of an artifact for ``edge-fleet publish``: ``--artifact-url``, ``--upload-dir``.

The URLs go into the signed manifest (``artifact.urls``, tried by devices in order);
``{sha256}`` in a URL stands for the artifact's sha256, so one template serves every
release of a folder laid out by ``--upload-dir`` (``DIR/{sha256}``). With URLs the
broker carries the manifest only, unless ``--broker-chunks`` uploads the chunks too
as the devices' fallback (``artifact.broker_chunks`` says which).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.wire.errors import ManifestInvalid, UsageError
from agent.wire.manifest import check_artifact_urls

from fleet.report import Report


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
