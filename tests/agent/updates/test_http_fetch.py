"""agent/updates/http_fetch.py against a real nginx (tests/fixtures/nginx.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.updates.http_fetch import (
    OriginChecksumMismatch,
    OriginSizeMismatch,
    OriginStatus,
    OriginTooLong,
    OriginUnreachable,
    download,
)
from agent.wire.errors import PackageError
from tests.fixtures.broker import free_port
from tests.fixtures.nginx import Nginx, range_ignoring_server

SIZE = 1_000_000


def artifact(request: pytest.FixtureRequest, nginx: Nginx, size: int = SIZE) -> tuple[str, bytes]:
    """A random file on the origin, named after the test; (name, bytes)."""
    data = os.urandom(size)
    name = f"{request.node.name}.bin".replace("[", "_").replace("]", "_")
    nginx.put(name, data)
    return name, data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_whole_download_is_verified_and_one_plain_request(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    part = tmp_path / "a.part"
    assert download(nginx.url(name), part, size=SIZE, sha256=sha(data)) == part
    assert part.read_bytes() == data
    [only] = nginx.wait_requests(f"/{name}", 1)
    assert (only.range, only.status, only.bytes_sent) == ("", 200, SIZE)


def test_a_cut_download_resumes_where_it_stopped_without_fetching_bytes_twice(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    part = tmp_path / "a.part"
    kept: list[int] = []
    nginx.cut_next(after=300_000)
    download(nginx.relay_url(name), part, size=SIZE, sha256=sha(data), progress=kept.append)
    assert part.read_bytes() == data
    first, second = nginx.wait_requests(f"/{name}", 2)
    # The cut one: whole-file GET. nginx may have pushed more than the client got into
    # socket buffers; what counts is what the client asked for next.
    assert (first.range, first.status) == ("", 200)
    assert max(k for k in kept if k <= 300_000) == 300_000
    assert (second.range, second.status) == ("bytes=300000-", 206)
    assert second.bytes_sent == SIZE - 300_000  # the rest, and only the rest


def test_a_restart_with_the_partial_left_resumes(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    part = tmp_path / "a.part"
    nginx.cut_next(after=400_000)
    # attempts=1: this "agent" stops at the cut, as if it were restarted.
    with pytest.raises(OriginUnreachable, match=r"body cut at 400000 of 1000000 bytes"):
        download(nginx.relay_url(name), part, size=SIZE, sha256=sha(data), attempts=1)
    assert part.read_bytes() == data[:400_000]
    download(nginx.url(name), part, size=SIZE, sha256=sha(data))  # the new process
    assert part.read_bytes() == data
    resumed = nginx.wait_requests(f"/{name}", 2)[-1]
    assert (resumed.range, resumed.status, resumed.bytes_sent) == ("bytes=400000-", 206, 600_000)


def test_a_complete_partial_is_done_on_416(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    part = tmp_path / "a.part"
    part.write_bytes(data)
    download(nginx.url(name), part, size=SIZE, sha256=sha(data))
    [only] = nginx.wait_requests(f"/{name}", 1)
    assert (only.range, only.status) == (f"bytes={SIZE}-", 416)
    assert part.read_bytes() == data


def test_a_wrong_file_on_the_origin_is_refused_by_hash_and_the_partial_removed(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    wanted = sha(b"x" * SIZE)  # the manifest describes another file of the same size
    part = tmp_path / "a.part"
    with pytest.raises(OriginChecksumMismatch) as caught:
        download(nginx.url(name), part, size=SIZE, sha256=wanted)
    message = str(caught.value)
    assert nginx.url(name) in message and wanted in message and sha(data) in message
    assert isinstance(caught.value, PackageError)  # fetch.py's "retry later" family
    assert not part.exists()


def test_a_shorter_file_on_the_origin_is_refused_by_size(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx, size=SIZE - 10)
    part = tmp_path / "a.part"
    with pytest.raises(OriginSizeMismatch, match=rf"{SIZE - 10} bytes, the manifest says {SIZE}"):
        download(nginx.url(name), part, size=SIZE, sha256=sha(data))
    assert not part.exists()


def test_a_body_longer_than_the_size_is_refused_before_it_is_read(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    part = tmp_path / "a.part"
    with pytest.raises(OriginTooLong, match=r"at least 1000000 bytes, the manifest says 1000"):
        download(nginx.url(name), part, size=1000, sha256=sha(data[:1000]))
    assert part.stat().st_size == 0


def test_404_names_the_url(nginx: Nginx, tmp_path: Path) -> None:
    url = nginx.url("no-such-artifact.bin")
    with pytest.raises(OriginStatus, match=rf"artifact origin {url}: HTTP 404 Not Found"):
        download(url, tmp_path / "a.part", size=10, sha256="0" * 64)


def test_connection_refused_names_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/a.bin"
    with pytest.raises(OriginUnreachable, match=rf"{url}: cannot connect: .*refused"):
        download(url, tmp_path / "a.part", size=10, sha256="0" * 64)


def test_tls_with_the_device_ca_and_refused_without_it(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx, size=100_000)
    part = tmp_path / "a.part"
    with pytest.raises(OriginUnreachable, match=r"CERTIFICATE_VERIFY_FAILED"):
        download(nginx.tls_url(name), part, size=100_000, sha256=sha(data))  # system store
    download(nginx.tls_url(name), part, size=100_000, sha256=sha(data), ca_file=nginx.ca_file)
    assert part.read_bytes() == data


def test_a_server_that_ignores_range_starts_over_correctly(
    request: pytest.FixtureRequest, nginx: Nginx, tmp_path: Path
) -> None:
    name, data = artifact(request, nginx)
    part = tmp_path / "a.part"
    part.write_bytes(data[:250_000])  # an earlier, cut download
    with range_ignoring_server(nginx.root) as (base, ranges):
        download(f"{base}/{name}", part, size=SIZE, sha256=sha(data))
    assert ranges == ["bytes=250000-"]  # asked to resume, got the whole file: 200
    assert part.read_bytes() == data
