"""Artifact chunks on the broker: one chunk size per artifact, upload, garbage collection.

A chunk topic ``{prefix}/artifacts/{sha256}/{index}`` names the artifact by its content
alone, so every fleet that is sent the artifact reads the same chunks. Their size is
therefore fixed by the first upload: a later publish (another fleet, another
``--chunk-size``) reuses it in its manifest and says so, and never overwrites the
chunks with another size. That overwrite is what broke new devices of the first fleet
(issue 13): their signed manifest still said the old size.

``gc`` clears chunks of artifacts no desired manifest or history entry names, and the
indices beyond what the manifests that do name one need (left by an earlier, smaller
chunk size).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.wire.manifest import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, chunk_count

from fleet.report import Report
from fleet.retained import Session, upload_artifact


@dataclass(frozen=True)
class Layout:
    """How an artifact is chunked on the broker, judged by its first and last chunk."""

    chunk_size: int
    chunks: int
    complete: bool  # the last chunk is retained with the length this chunking gives

    def fits(self, chunk_size: int, size: int) -> bool:
        """A manifest saying ``chunk_size`` describes these chunks."""
        return chunk_count(size, chunk_size) == self.chunks and (
            self.chunks == 1 or chunk_size == self.chunk_size
        )


def retained_layout(session: Session, sha256: str, size: int) -> Layout | None:
    """The retained chunking of an artifact; None when none of it is retained.

    Chunk 0 is full size unless it is the only one, so its length is the chunk size.
    A first chunk no chunking of this size could produce is not ours: None too.
    """
    first_topic = session.topics.artifact_chunk(sha256, 0)
    first = session.read_retained([first_topic]).get(first_topic)
    if first is None:
        return None
    if len(first) == size:
        return Layout(chunk_size=size, chunks=1, complete=True)
    if not (MIN_CHUNK_SIZE <= len(first) <= MAX_CHUNK_SIZE and len(first) < size):
        return None
    chunks = chunk_count(size, len(first))
    last_topic = session.topics.artifact_chunk(sha256, chunks - 1)
    last = session.read_retained([last_topic]).get(last_topic)
    complete = last is not None and len(last) == size - (chunks - 1) * len(first)
    return Layout(chunk_size=len(first), chunks=chunks, complete=complete)


def chunk_size_for(layout: Layout | None, wanted: int, size: int) -> int:
    """The chunk size a new manifest must say: the retained one, else ``wanted``."""
    if layout is None or layout.fits(wanted, size):
        return wanted
    return max(layout.chunk_size, MIN_CHUNK_SIZE) if layout.chunks == 1 else layout.chunk_size


def ensure_artifact(
    session: Session, path: Path, sha256: str, size: int, *, wanted: int, report: Report
) -> tuple[int, bool]:
    """Make every chunk of the artifact retained; returns (chunk size, uploaded?)."""
    layout = retained_layout(session, sha256, size)
    chunk_size = chunk_size_for(layout, wanted, size)
    if chunk_size != wanted:
        report.note(
            f"artifact {sha256[:12]} is retained in chunks of {chunk_size} bytes: the manifest "
            f"says {chunk_size}, not --chunk-size {wanted} (one artifact has one chunk size "
            "on the broker; other fleets' devices read the same chunks)"
        )
    if layout is not None and layout.complete:
        report.note(f"artifact {sha256[:12]} is already on the broker")
        return chunk_size, False
    if layout is not None:
        report.note(f"artifact {sha256[:12]} is only partly on the broker: uploading it again")
    upload_artifact(session, path, sha256, chunk_size)
    return chunk_size, True


# --- gc ------------------------------------------------------------------------------


def _manifests(payloads: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    """Desired manifests and history entries, whatever retained topic they came from."""
    for payload in payloads:
        try:
            data = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        entries = data.get("entries")
        for m in [data, *(entries if isinstance(entries, list) else [])]:
            if isinstance(m, dict) and isinstance(m.get("artifact"), dict):
                yield m


def _chunks_needed(artifact: dict[str, Any]) -> int | None:
    try:
        if isinstance(artifact.get("chunks"), int):
            return int(artifact["chunks"])
        return chunk_count(int(artifact["size"]), int(artifact["chunk_size"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def collect(session: Session, *, dry_run: bool, report: Report) -> dict[str, Any]:
    """Clear chunks of unreferenced artifacts and chunk indices no manifest needs."""
    t = session.topics
    refs = session.read_retained([
        t.fleet_desired("+", "+"), t.device_desired("+", "+"),
        t.fleet_history("+", "+"), t.device_history("+", "+"),
    ])  # fmt: skip
    need: dict[str, int] = {}  # sha256 -> chunks the referencing manifests need (the most)
    for m in _manifests(refs.values()):
        sha = m["artifact"].get("sha256")
        if isinstance(sha, str):
            # A manifest that does not say its chunking keeps every chunk of its artifact.
            n = _chunks_needed(m["artifact"])
            need[sha] = max(need.get(sha, 0), n if n is not None else 1 << 62)
    chunks = session.read_retained([f"{t.prefix}/artifacts/#"], timeout=60)
    orphans, stale = [], []
    for topic in sorted(chunks):
        sha, index = topic.split("/")[-2:]
        if sha not in need:
            orphans.append(topic)
        elif index.isdigit() and int(index) >= need[sha]:
            stale.append(topic)
    artifacts = sorted({topic.split("/")[-2] for topic in orphans})
    if not dry_run:
        session.wait([session.publish(topic, b"") for topic in orphans + stale], "clearing chunks")
    verb = "would clear" if dry_run else "cleared"
    extra = f", and {len(stale)} stale chunks beyond what their manifests need" if stale else ""
    report.say(
        f"{verb} {len(artifacts)} artifacts ({len(orphans)} chunks){extra}; kept {len(need)}"
    )
    report.facts.update(
        dry_run=dry_run,
        artifacts_cleared=artifacts,
        chunks_cleared=len(orphans),
        stale_chunks_cleared=sorted(stale),
        artifacts_kept=sorted(need),
    )
    return report.facts
