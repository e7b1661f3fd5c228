"""``PartialDownload.adopt``: a whole file from an HTTP origin becomes the download."""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.updates.download import PartialDownload
from agent.wire.manifest import Artifact


def test_an_adopted_file_is_complete_verified_and_stays_complete(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    art = Artifact("model.onnx", len(data), hashlib.sha256(data).hexdigest(), 300)
    dl = PartialDownload(tmp_path, art)
    dl.write(1, data[300:600])  # some chunks came from the broker before
    fetched = dl.dir / "http.part"
    fetched.write_bytes(data)
    dl.adopt(fetched)
    assert dl.complete and not fetched.exists()
    assert dl.verify().read_bytes() == data
    again = PartialDownload(tmp_path, art)  # after a restart: one record of "complete"
    assert again.complete and again.missing() == []
    assert (again.package({"name": "iris"}) / "model.onnx").read_bytes() == data
