"""``edge-fleet publish --artifact-url/--upload-dir/--broker-chunks`` against a real mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.wire.manifest import parse_manifest
from agent.wire.signing import key_id, load_public_key, verify_signature
from fleet.cli import main
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, desired, retained

ORIGIN = "https://cdn.example/artifacts/{sha256}"


def test_urls_are_signed_the_file_copied_and_no_chunk_uploaded(
    broker: Broker, keypair: Keypair, iris_package: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    www = tmp_path / "www"
    www.mkdir()
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--json",
               "--artifact-url", ORIGIN, "--artifact-url", "http://10.0.0.2/a.onnx",
               "--upload-dir", str(www))  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    body = desired(broker)
    manifest = parse_manifest(body)
    sha = manifest.artifact.sha256
    urls = [f"https://cdn.example/artifacts/{sha}", "http://10.0.0.2/a.onnx"]
    assert (list(manifest.artifact.urls), manifest.artifact.broker_chunks) == (urls, False)
    pub = load_public_key(keypair.pub)
    assert verify_signature(manifest, {key_id(pub): pub}) == key_id(pub)
    copy = www / sha
    assert copy.read_bytes() == (iris_package / "model.onnx").read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in www.iterdir()] == [sha]  # no temporary file left behind
    assert "uploading" not in err
    assert retained(broker, f"edge/artifacts/{sha}/+") == {}
    doc = json.loads(out)
    assert (doc["urls"], doc["broker_chunks"], doc["uploaded"]) == (urls, False, False)


def test_broker_chunks_uploads_both(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1",
               "--artifact-url", ORIGIN, "--broker-chunks")  # fmt: skip
    assert main(args) == 0
    manifest = parse_manifest(desired(broker))
    assert manifest.artifact.broker_chunks is True and len(manifest.artifact.urls) == 1
    assert "broker_chunks" not in desired(broker)["artifact"]  # absent means chunks
    sha = manifest.artifact.sha256
    assert f"edge/artifacts/{sha}/0" in retained(broker, f"edge/artifacts/{sha}/+")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--upload-dir", "/tmp"], "--upload-dir: needs --artifact-url"),
        (["--artifact-url", "ftp://cdn.example/a"], "--artifact-url: artifact.urls[0]: expected"),
        (["--artifact-url", ORIGIN, "--upload-dir", "/nonexistent-dir"], "is not a folder"),
    ],
)
def test_bad_origin_flags_are_refused_before_anything_is_sent(
    broker: Broker, keypair: Keypair, iris_package: Path, flags: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", *flags)
    assert main(args) != 0
    assert message in capsys.readouterr().err
    assert retained(broker, "edge/fleets/f1/models/iris/desired") == {}


def test_rollout_and_rollback_keep_the_urls_and_need_no_chunks(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for package in (iris_package, iris_package_v2):
        args = cli(broker, keypair, "publish", str(package), "--fleet", "f1", "--rollout", "50",
                   "--artifact-url", ORIGIN)  # fmt: skip
        assert main(args) == 0
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "100")) == 0
    widened = parse_manifest(desired(broker))
    assert widened.version == "1.1.0" and widened.artifact.urls[0].endswith(widened.artifact.sha256)
    assert main(cli(broker, keypair, "rollback", "iris", "--fleet", "f1")) == 0
    back = parse_manifest(desired(broker))
    assert back.version == "1.0.0" and back.artifact.broker_chunks is False
    assert back.artifact.urls == (ORIGIN.replace("{sha256}", back.artifact.sha256),)
    assert retained(broker, "edge/artifacts/#") == {}
