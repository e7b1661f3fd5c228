"""One desired artifact onto this device's disk: from its own store, else its HTTP(S)
origins (``artifact.urls``, in order), else broker chunks.

An origin download (``agent/updates/http_fetch.py``) resumes in ``http.part`` of the
artifact's download folder; the verified file is handed to the PartialDownload whole
(``adopt``). When every URL fails, the chunks are the fallback if the manifest says the
publisher uploaded them (``artifact.broker_chunks``), else the delivery retries later.
The delivery worker (``agent/updates/delivery.py``) calls ``package``; this module
subscribes to ``edge/artifacts/{sha256}/+`` for as long as it needs chunks, writes
each at its offset (``agent/updates/download.py``, resumable across reconnects and
restarts) and checks size and sha256 of the whole. Chunks arrive on paho's thread and
only pass through a queue here; the worker thread does the writing. ``package`` says
where the artifact came from (``Fetched``), and ``falling_back`` hears each URL's
failure before the chunks are fetched instead (the ``artifact_fallback`` event).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.disk import atomic_write
from agent.updates import http_fetch
from agent.updates.download import PartialDownload
from agent.wire import payloads
from agent.wire.errors import EdgeError, PackageError, StorageFull
from agent.wire.manifest import Manifest
from agent.wire.topics import Topics

if TYPE_CHECKING:
    from agent.config import Config
    from agent.link import Link, Message
    from agent.loops import Loop
    from agent.models.store import ModelStore

log = logging.getLogger(__name__)
HTTP_PART = "http.part"
# The URL a complete download came from, so a restart between download and install
# still says so; absent: the download is made of broker chunks.
ORIGIN_FILE = "origin.url"
# What one URL can fail with; the next URL (or the chunks) gets its turn.
ORIGIN_FAILURES = (
    http_fetch.OriginError,
    http_fetch.OriginChecksumMismatch,
    http_fetch.OriginSizeMismatch,
)


class Retry(EdgeError):
    """A delivery that failed for now (missing chunk, corrupt artifact, full disk)."""


class Superseded(Exception):
    """A newer desired manifest arrived (or the agent stops) during the download."""


@dataclass(frozen=True)
class Fetched:
    """A verified package folder and where its artifact came from."""

    package: Path
    source: str  # payloads.ARTIFACT_SOURCES
    url: str | None = None  # the origin that served it
    # (url, error) of each origin that failed before the source that delivered
    failures: tuple[tuple[str, str], ...] = ()


class ArtifactFetcher:
    """Makes a package folder for a desired manifest, without trusting the bytes early."""

    def __init__(
        self,
        cfg: Config,
        mqtt: Link,
        store: ModelStore,
        loop: Loop,
        pause: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.mqtt = mqtt
        self.store = store
        self.loop = loop  # beats while chunks arrive, says when the agent stops
        self.pause = pause  # the test hook of delivery (EDGE_DELIVERY_PAUSE_AT)
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.root = cfg.state_path / "downloads"
        self._chunks: queue.Queue[tuple[str, int, bytes]] = queue.Queue()

    def package(
        self,
        manifest: Manifest,
        *,
        starting: Callable[[PartialDownload], None],
        wanted: Callable[[], bool],
        falling_back: Callable[[list[tuple[str, str]]], None] | None = None,
    ) -> Fetched:
        """A verified package folder for ``manifest``. ``starting(dl)`` is told before a
        download starts or resumes; ``wanted()`` turning False (a newer desired manifest)
        ends the download with ``Superseded``; ``falling_back(failures)`` before the
        broker chunks are fetched because no URL served the artifact. Retry when it
        fails for now."""
        local = self._from_store(manifest)
        if local is not None:
            return Fetched(local, payloads.STORE)
        dl = PartialDownload(self.root, manifest.artifact)
        failures: list[tuple[str, str]] = []
        if not dl.complete:
            try:
                dl.check_disk()
            except StorageFull as e:
                raise Retry(str(e)) from None
            starting(dl)
            if not self._from_origins(manifest, dl, wanted, failures):
                if failures and falling_back is not None:
                    falling_back(failures)
                self._fetch(manifest, dl, wanted)
        url = self._origin_of(dl)
        self.pause("verify")
        try:
            dl.verify()
        except PackageError as e:
            raise Retry(f"downloaded artifact: {e}") from None
        self.pause("verified")
        source = payloads.ORIGIN if url is not None else payloads.BROKER_CHUNKS
        return Fetched(dl.package(manifest.to_dict()), source, url, tuple(failures))

    @staticmethod
    def _origin_of(dl: PartialDownload) -> str | None:
        try:
            return (dl.dir / ORIGIN_FILE).read_text("utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def _from_store(self, manifest: Manifest) -> Path | None:
        """A version already in the store with this artifact (a rollback, a re-signed
        rollout) is installed from there: nothing to download."""
        if manifest.version not in self.store.versions(manifest.name):
            return None
        try:
            stored = self.store.manifest(manifest.name, manifest.version)
        except EdgeError:
            return None
        if stored.artifact.sha256 != manifest.artifact.sha256:
            return None
        src = self.store.version_dir(manifest.name, manifest.version) / manifest.artifact.file
        dl = PartialDownload(self.root, manifest.artifact)
        pkg = dl.dir / "package"
        pkg.mkdir(exist_ok=True)
        target = pkg / manifest.artifact.file
        target.unlink(missing_ok=True)
        try:
            os.link(src, target)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(src, target)
        atomic_write(pkg / "manifest.json", json.dumps(manifest.to_dict()).encode())
        return pkg

    def _from_origins(
        self,
        manifest: Manifest,
        dl: PartialDownload,
        wanted: Callable[[], bool],
        failures: list[tuple[str, str]],
    ) -> bool:
        """The artifact from its first URL that serves it, adopted by ``dl``; False when
        there are none or all failed and the chunks remain (each URL's failure added to
        ``failures``). Retry when nothing remains."""
        art = manifest.artifact
        if not art.urls:
            return False
        ca = Path(self.cfg.mqtt.ca) if self.cfg.mqtt.ca else None  # resolved by the config

        def progress(_have: int) -> None:
            self.loop.beat()
            if self.loop.stopping or not wanted():
                raise Superseded()

        part = dl.dir / HTTP_PART
        for url in art.urls:
            try:
                http_fetch.download(url, part, size=art.size, sha256=art.sha256, ca_file=ca,
                                    timeout_s=self.cfg.models.delivery_chunk_timeout_s,
                                    progress=progress)  # fmt: skip
            except ORIGIN_FAILURES as e:
                log.warning("artifact %s: %s", art.sha256[:12], e)
                failures.append((url, str(e)))
                continue
            try:
                # Before the adoption: once the part is complete it must name its origin.
                atomic_write(dl.dir / ORIGIN_FILE, url.encode())
                dl.adopt(part)
            except OSError as e:  # this device's disk, not the origin
                raise Retry(f"artifact {art.sha256[:12]}: writing {part}: {e}") from None
            return True
        if art.broker_chunks:
            return False  # the caller says so (delivery's artifact_fallback event)
        raise Retry(
            f"artifact {art.sha256[:12]}: no origin served it "
            f"({'; '.join(error for _, error in failures)}); "
            f"retrying in {self.cfg.models.delivery_retry_s:g} s"
        )

    def _on_chunk(self, msg: Message) -> None:
        parts = msg.topic.rsplit("/", 2)
        if len(parts) == 3 and parts[2].isdigit():
            self._chunks.put((parts[1], int(parts[2]), msg.payload))

    def _fetch(self, manifest: Manifest, dl: PartialDownload, wanted: Callable[[], bool]) -> None:
        art = manifest.artifact
        # These chunks, not an origin, complete the download (a stale name would lie).
        (dl.dir / ORIGIN_FILE).unlink(missing_ok=True)
        while not self._chunks.empty():  # leftovers of an earlier subscription
            self._chunks.get_nowait()
        topic = self.topics.artifact_all(art.sha256)
        self.mqtt.subscribe(topic, 1, self._on_chunk)
        timeout = self.cfg.models.delivery_chunk_timeout_s
        last_progress = time.monotonic()
        try:
            while not dl.complete:
                self.loop.beat()
                if self.loop.stopping or not wanted():
                    raise Superseded()
                try:
                    sha, index, data = self._chunks.get(timeout=0.5)
                except queue.Empty:
                    if time.monotonic() - last_progress > timeout:
                        first, count = dl.missing(limit=1)[0], dl.missing_count
                        more = f" (and {count - 1} more)" if count > 1 else ""
                        raise Retry(
                            f"missing chunk {first}{more} of artifact {art.sha256}: "
                            f"nothing new for {timeout:g} s; retrying in "
                            f"{self.cfg.models.delivery_retry_s:g} s"
                        ) from None
                    continue
                if sha != art.sha256:
                    continue
                try:
                    new = dl.write(index, data)
                except PackageError as e:
                    raise Retry(f"artifact {art.sha256[:12]}: {e}") from None
                if new:
                    last_progress = time.monotonic()
                    self.pause(f"chunk:{len(dl.have)}")
        finally:
            self.mqtt.unsubscribe(topic)
