"""Resumable chunk assembly on disk: one artifact, one folder under the state folder.

Chunks arrive in any order (retained messages after every (re)subscribe), possibly
twice. Each new chunk is written at its offset in ``artifact.part`` and fsynced, and
only then its index is appended to ``chunks.log``. After a crash the log names only
chunks whose bytes are on disk, so a restart asks for the missing ones alone; a torn
last log line is ignored. The whole file is checked (size, sha256) before anything
trusts it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent.disk import atomic_write, fsync_dir, sha256_file
from agent.wire.errors import ChecksumMismatch, PackageError, SizeMismatch, StorageFull
from agent.wire.manifest import MANIFEST_FILE, Artifact
from agent.wire.package import write_manifest

PART_FILE = "artifact.part"
LOG_FILE = "chunks.log"
META_FILE = "artifact.json"
PACKAGE_DIR = "package"
# Room kept free beside the artifact: the store copy needs as much again, plus slack.
DISK_MARGIN = 16 * 1024 * 1024


class PartialDownload:
    """The chunks of one artifact received so far, kept across restarts."""

    def __init__(self, root: Path, artifact: Artifact) -> None:
        self.artifact = artifact
        self.dir = root / artifact.sha256
        self.part = self.dir / PART_FILE
        self.log = self.dir / LOG_FILE
        self.have: set[int] = set()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._read_meta() != self._meta():
            # Another chunking of the same artifact (or a fresh start): the old
            # progress does not line up with these chunk indices.
            self._reset()
        else:
            self.have = self._read_log()

    # --- state -----------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        a = self.artifact
        return {"size": a.size, "chunk_size": a.chunk_size, "sha256": a.sha256}

    def _read_meta(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / META_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _read_log(self) -> set[int]:
        try:
            text = self.log.read_text("ascii", errors="replace")
        except FileNotFoundError:
            return set()
        have = set()
        lines = text.split("\n")
        # The last element is "" after a complete line; anything else is a torn write.
        for line in lines[:-1]:
            if line.isdigit() and int(line) < self.artifact.chunks:
                have.add(int(line))
        return have

    def _reset(self) -> None:
        for name in (PART_FILE, LOG_FILE, META_FILE):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / PACKAGE_DIR, ignore_errors=True)
        self.have = set()
        atomic_write(self.dir / META_FILE, json.dumps(self._meta()).encode())

    @property
    def complete(self) -> bool:
        return len(self.have) == self.artifact.chunks

    def missing(self, limit: int | None = None) -> list[int]:
        """Indices still missing, in order (the first ``limit`` of them)."""
        out: list[int] = []
        for i in range(self.artifact.chunks):
            if i not in self.have:
                out.append(i)
                if limit is not None and len(out) >= limit:
                    break
        return out

    @property
    def missing_count(self) -> int:
        return self.artifact.chunks - len(self.have)

    def bytes_needed(self) -> int:
        """Disk still needed: the missing chunks plus a store copy of the whole artifact."""
        # From what is there, not what is missing: a manifest may claim absurd sizes.
        missing = self.artifact.size - sum(self.artifact.chunk_length(i) for i in self.have)
        return missing + self.artifact.size + DISK_MARGIN

    def check_disk(self) -> None:
        """StorageFull naming both figures when the state folder is too full."""
        free = shutil.disk_usage(self.dir).free
        need = self.bytes_needed()
        if free < need:
            raise StorageFull(
                f"state folder {self.dir.parent}: {free} bytes free, the artifact "
                f"{self.artifact.sha256[:12]} needs {need} (size {self.artifact.size} "
                f"+ store copy + {DISK_MARGIN} margin)"
            )

    # --- writing ---------------------------------------------------------------------

    def write(self, index: int, data: bytes) -> bool:
        """Store chunk ``index``; True when it was new. PackageError for a malformed chunk."""
        if not 0 <= index < self.artifact.chunks:
            raise PackageError(
                f"chunk {index}: index out of range (artifact has {self.artifact.chunks} chunks)"
            )
        if index in self.have:
            return False
        want = self.artifact.chunk_length(index)
        if len(data) != want:
            raise PackageError(
                f"chunk {index}: {len(data)} bytes, expected {want} "
                f"(artifact {self.artifact.size} bytes in chunks of {self.artifact.chunk_size})"
            )
        flags = os.O_WRONLY | os.O_CREAT
        fd = os.open(self.part, flags, 0o644)
        try:
            os.pwrite(fd, data, index * self.artifact.chunk_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Logged only after the bytes are durable: the log never claims a lost chunk.
        with self.log.open("a", encoding="ascii") as f:
            f.write(f"{index}\n")
            f.flush()
            os.fsync(f.fileno())
        self.have.add(index)
        return True

    def adopt(self, path: Path) -> None:
        """Take a whole artifact fetched some other way (an HTTP origin) as the part,
        every chunk present: the chunk log stays the one record of "complete"."""
        os.replace(path, self.part)
        fsync_dir(self.dir)
        # Written after the rename is durable: the log never claims bytes it lacks.
        atomic_write(self.log, "".join(f"{i}\n" for i in range(self.artifact.chunks)).encode())
        self.have = set(range(self.artifact.chunks))

    def verify(self) -> Path:
        """Size and sha256 of the assembled file; a mismatch discards it for a fresh start."""
        try:
            size = self.part.stat().st_size
            if size != self.artifact.size:
                raise SizeMismatch(f"artifact {self.artifact.file}", self.artifact.size, size)
            digest = sha256_file(self.part)
            if digest != self.artifact.sha256:
                raise ChecksumMismatch(
                    f"artifact {self.artifact.file}", self.artifact.sha256, digest
                )
        except (SizeMismatch, ChecksumMismatch):
            self._reset()
            raise
        return self.part

    def package(self, manifest: dict[str, Any]) -> Path:
        """A package folder (artifact + manifest.json) for the installer, from the verified part."""
        pkg = self.dir / PACKAGE_DIR
        shutil.rmtree(pkg, ignore_errors=True)
        pkg.mkdir()
        target = pkg / self.artifact.file
        try:
            os.link(self.part, target)  # no second copy of a 50 MB artifact
        except OSError:
            shutil.copyfile(self.part, target)
        write_manifest(pkg, manifest)
        assert (pkg / MANIFEST_FILE).is_file()
        return pkg


def clean_downloads(root: Path, keep: set[str]) -> list[str]:
    """Remove download folders of artifacts no longer wanted; returns the removed names."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed
