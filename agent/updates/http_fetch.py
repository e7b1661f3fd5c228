"""One artifact from an HTTP(S) origin into a partial file, resumable with Range requests.

The partial file holds a prefix of the artifact and nothing else, so its size is the
offset to resume from, after a cut connection or a restart of the agent. The origin
answers ``206`` with a ``Content-Range`` starting at that offset (append), ``200``
(it ignores Range: start over), or ``416`` when nothing is left (the file is complete).
Size and sha256 are checked at the end; a mismatch removes the partial. Standard
library only: the device gains no dependency. Called by `agent/updates/fetch.py`.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agent.disk import fsync_dir, sha256_file
from agent.wire.errors import ChecksumMismatch, EdgeError, SizeMismatch

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
# A power cut loses at most this much progress: fsync the partial every so often.
SYNC_EVERY = 4 * 1024 * 1024
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class OriginError(EdgeError):
    """The origin could not give us the artifact this time; the message names the URL."""

    status = 502

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"artifact origin {url}: {problem}")
        self.url = url


class OriginUnreachable(OriginError):
    """Connection refused, timed out, TLS failed, or the body stopped early every time."""


class OriginStatus(OriginError):
    """An HTTP status we cannot use (404, 500, a 416 for an incomplete file)."""

    def __init__(self, url: str, code: int, reason: str) -> None:
        super().__init__(url, f"HTTP {code} {reason}")
        self.code = code


class OriginTooLong(OriginError):
    def __init__(self, url: str, got: int, size: int) -> None:
        super().__init__(url, f"body is at least {got} bytes, the manifest says {size}")


class OriginBadRange(OriginError):
    """A 206 that is not the range we asked for: appending it would corrupt the file."""


class OriginChecksumMismatch(ChecksumMismatch):
    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(f"artifact from {url}", expected, actual)
        self.url = url


class OriginSizeMismatch(SizeMismatch):
    def __init__(self, url: str, expected: int, actual: int) -> None:
        super().__init__(f"artifact from {url}", expected, actual)
        self.url = url


class _Cut(Exception):
    """The body ended before its length (connection closed or reset mid-body)."""


def download(
    url: str,
    part: Path,
    *,
    size: int,
    sha256: str,
    ca_file: Path | None = None,
    timeout_s: float = 30.0,
    attempts: int = 3,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """``url`` into ``part`` (resuming from what ``part`` holds), verified against
    ``size`` and ``sha256``; returns ``part``. ``attempts`` bounds the reconnects after
    cuts within this call; ``progress(bytes_on_disk)`` is told after every block."""
    # cafile=None is the system store; a device with its own CA names it.
    context = (
        ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if url.lower().startswith("https:")
        else None
    )
    part.parent.mkdir(parents=True, exist_ok=True)
    if not part.exists():
        part.touch()
        fsync_dir(part.parent)  # the partial's entry survives a power cut with its bytes
    for attempt in range(1, attempts + 1):
        before = part.stat().st_size
        try:
            _one_request(
                url, part, size=size, context=context, timeout_s=timeout_s, progress=progress
            )
            break
        except _Cut as e:
            got = part.stat().st_size
            log.info(
                "artifact %s cut at %d of %d bytes (%s), attempt %d", url, got, size, e, attempt
            )
            # Give up only when the cuts stop making progress, or after ``attempts``.
            if attempt == attempts or got == before:
                raise OriginUnreachable(
                    url, f"body cut at {got} of {size} bytes ({e}), attempt {attempt} of {attempts}"
                ) from None
    _verify(url, part, size, sha256)
    return part


def _one_request(
    url: str,
    part: Path,
    *,
    size: int,
    context: ssl.SSLContext | None,
    timeout_s: float,
    progress: Callable[[int], None] | None,
) -> None:
    offset = part.stat().st_size
    if offset > size:  # a partial of some other file: it cannot be a prefix of this one
        _truncate(part)
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    # identity: a gzip'd body would have neither the length nor the ranges of the file.
    headers["Accept-Encoding"] = "identity"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s, context=context)
    except urllib.error.HTTPError as e:
        e.close()
        if (
            e.code == 416
            and offset == size
            and _total(e.headers.get("Content-Range"))
            in (
                size,
                None,
            )
        ):
            return  # nothing left to send: the partial is the whole file
        raise OriginStatus(url, e.code, str(e.reason)) from None
    except urllib.error.URLError as e:
        raise OriginUnreachable(url, f"cannot connect: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeout, reset before the headers
        raise OriginUnreachable(url, f"no answer: {e}") from None
    with response:
        if response.status == 206:
            _check_range(url, response.headers.get("Content-Range"), offset, size)
            expect = size - offset
        elif response.status == 200:
            if offset:
                log.warning("artifact %s: the origin ignores Range; starting over", url)
                _truncate(part)
                offset = 0
            expect = size
        else:
            raise OriginStatus(url, response.status, response.reason)
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > expect:
            raise OriginTooLong(url, offset + int(length), size)
        _copy_body(
            url, response, part, offset=offset, size=size, timeout_s=timeout_s, progress=progress
        )


def _copy_body(
    url: str,
    response: http.client.HTTPResponse,
    part: Path,
    *,
    offset: int,
    size: int,
    timeout_s: float,
    progress: Callable[[int], None] | None,
) -> None:
    have, synced = offset, offset
    with part.open("r+b") as f:
        f.seek(offset)
        try:
            while True:
                # One byte past the size is enough to know the body is too long.
                block = response.read(min(BLOCK, size - have + 1))
                if not block:
                    break
                if have + len(block) > size:
                    f.close()
                    _truncate(part)  # whatever it is, it is not our artifact
                    raise OriginTooLong(url, have + len(block), size)
                f.write(block)
                have += len(block)
                if have - synced >= SYNC_EVERY:
                    f.flush()
                    os.fsync(f.fileno())
                    synced = have
                if progress is not None:
                    progress(have)
        except TimeoutError:
            raise _Cut(f"no bytes for {timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as e:  # reset, IncompleteRead (chunked)
            raise _Cut(str(e) or type(e).__name__) from None
        finally:
            # Kept bytes are durable before anyone resumes from the file's size.
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
    declared = response.length  # what is left of Content-Length; None when chunked
    if declared:
        raise _Cut(f"connection closed {declared} bytes before the end of the body")


def _check_range(url: str, header: str | None, offset: int, size: int) -> None:
    m = CONTENT_RANGE.fullmatch((header or "").strip())
    if m is None:
        raise OriginBadRange(url, f"206 with Content-Range {header!r}, asked bytes={offset}-")
    start, end, total = int(m[1]), int(m[2]), m[3]
    if total != "*" and int(total) != size:
        raise OriginSizeMismatch(url, size, int(total))
    if start != offset or end != size - 1:
        raise OriginBadRange(
            url, f"206 with Content-Range {header!r}, asked bytes={offset}-{size - 1}"
        )


def _total(header: str | None) -> int | None:
    m = re.fullmatch(r"bytes \*/(\d+)", (header or "").strip())
    return int(m[1]) if m else None


def _truncate(part: Path) -> None:
    with part.open("r+b") as f:
        f.truncate(0)
        os.fsync(f.fileno())


def _verify(url: str, part: Path, size: int, sha256: str) -> None:
    """Size, then sha256 of what is on disk; a mismatch removes the partial for a fresh start."""
    got = part.stat().st_size
    if got != size:
        part.unlink(missing_ok=True)
        raise OriginSizeMismatch(url, size, got)
    digest = sha256_file(part)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise OriginChecksumMismatch(url, sha256, digest)
