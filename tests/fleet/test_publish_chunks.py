"""One chunk size per artifact on the broker, and ``gc`` of stale chunks (issue 13).

The chunk topic names the artifact by sha256 alone, so two fleets sent the same
artifact read the same chunks. Publishing it to a second fleet with another
``--chunk-size`` used to overwrite them, and new devices of the first fleet, whose
signed manifest still said the old size, could no longer install it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.wire.package import read_manifest
from fleet.cli import main
from fleet.publish import publish
from fleet.retained import Session, upload_artifact
from tests.delivery_helpers import device_config, operator, predict_version
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, desired, retained


def chunk_lengths(broker: Broker, sha: str) -> dict[int, int]:
    got = retained(broker, f"edge/artifacts/{sha}/+")
    return {int(t.rsplit("/", 1)[1]): len(p) for t, p in got.items()}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_second_fleet_with_another_chunk_size_leaves_the_first_fleet_installable(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ops = operator(broker)
    publish(ops, iris_package, fleet="f1", key=keypair.key, chunk_size=256)
    capsys.readouterr()
    publish(ops, iris_package, fleet="f2", key=keypair.key, chunk_size=512)
    err = capsys.readouterr().err
    # Devices that join afterwards, in either fleet, install from the same chunks.
    for device, fleet in (("late-f1", "f1"), ("late-f2", "f2")):
        agent = start_agent(device_config(broker, keypair, device, fleet))
        agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", 30)
        assert predict_version(agent) == "1.0.0"
    assert "is retained in chunks of 256 bytes: the manifest says 256, not --chunk-size 512" in err
    assert "is already on the broker" in err and "uploading" not in err
    f1, f2 = desired(broker, "f1")["artifact"], desired(broker, "f2")["artifact"]
    assert f1["chunk_size"] == f2["chunk_size"] == 256 and f1["chunks"] == f2["chunks"]
    assert chunk_lengths(broker, f1["sha256"]) == {0: 256, 1: 256, 2: f1["size"] - 512}


def test_gc_clears_chunks_beyond_what_the_manifests_need(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What an earlier edge-fleet left: the artifact uploaded in 64-byte chunks, then
    # again in 256-byte chunks over the first ones; indices 3.. are left over.
    manifest = read_manifest(iris_package)
    sha, path = manifest.artifact.sha256, iris_package / manifest.artifact.file
    s = Session(operator(broker), "test")
    try:
        upload_artifact(s, path, sha, 64)
        upload_artifact(s, path, sha, 256)
    finally:
        s.close()
    assert len(chunk_lengths(broker, sha)) > 3
    assert main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1",
                    "--chunk-size", "256")) == 0  # fmt: skip
    capsys.readouterr()
    stale = len(range(3, -(-manifest.artifact.size // 64)))
    assert main(cli(broker, keypair, "gc", "--dry-run")) == 0
    assert (
        f"would clear 0 artifacts (0 chunks), and {stale} stale chunks" in capsys.readouterr().out
    )
    assert main(cli(broker, keypair, "gc", "--dry-run", "--json")) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # stdout is the JSON document alone; the line went to stderr
    assert len(report["stale_chunks_cleared"]) == stale and report["dry_run"] is True
    assert report["artifacts_kept"] == [sha] and report["artifacts_cleared"] == []
    assert "would clear" in err
    assert main(cli(broker, keypair, "gc")) == 0
    assert set(chunk_lengths(broker, sha)) == {0, 1, 2}
    assert f"cleared 0 artifacts (0 chunks), and {stale} stale chunks" in capsys.readouterr().out
