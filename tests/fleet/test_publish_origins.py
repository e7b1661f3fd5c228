"""``edge-fleet publish --artifact-url/--upload-dir/--broker-chunks`` and ``gc --upload-dir``
against a real mosquitto."""

from __future__ import annotations

import hashlib
import json
import os
import time
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


def _aged(path: Path, data: bytes = b"x", age_s: float = 7200) -> Path:
    """``path`` holding ``data``, last modified ``age_s`` ago (past --upload-min-age)."""
    path.write_bytes(data)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_gc_upload_dir_removes_only_sha256_files_nothing_needs(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    www = tmp_path / "www"
    www.mkdir()
    orphan = _aged(www / hashlib.sha256(b"an old release").hexdigest(), b"old bytes")
    gc = ["gc", "--upload-dir", str(www), "--json"]
    # Nothing retained names any artifact: the wrong broker, more likely than an unused folder.
    assert main(cli(broker, keypair, *gc)) == 0
    out, err = capsys.readouterr()
    assert "no desired state or history is retained on this broker" in err
    assert json.loads(out)["upload_dir_removed"] == [] and orphan.exists()

    for package in (iris_package, iris_package_v2):  # 1.0.0 stays needed: the history names it
        assert main(cli(broker, keypair, "publish", str(package), "--fleet", "f1",
                        "--artifact-url", ORIGIN, "--upload-dir", str(www))) == 0  # fmt: skip
    capsys.readouterr()
    needed = sorted(p.name for p in www.iterdir() if p != orphan)
    for name in needed:
        _aged(www / name, (www / name).read_bytes())
    fresh = www / hashlib.sha256(b"a publish under way").hexdigest()
    fresh.write_bytes(b"new bytes")  # copied, its desired state not yet retained
    odd = {
        "index.html": _aged(www / "index.html"),
        f".{orphan.name[:12]}.tmp": _aged(www / f".{orphan.name[:12]}.tmp"),
        orphan.name.upper(): _aged(www / orphan.name.upper()),
        orphan.name[:63]: _aged(www / orphan.name[:63]),
    }
    folder = www / hashlib.sha256(b"a folder").hexdigest()
    folder.mkdir()
    link = www / hashlib.sha256(b"a link").hexdigest()
    link.symlink_to(tmp_path / "elsewhere")

    assert main(cli(broker, keypair, *gc, "--dry-run")) == 0
    doc = json.loads(capsys.readouterr()[0])
    assert (doc["dry_run"], doc["upload_dir_removed"], doc["upload_dir_kept"]) == (
        True, [orphan.name], needed,
    )  # fmt: skip
    assert orphan.exists()
    skipped = {s["name"]: s["reason"] for s in doc["upload_dir_skipped"]}
    assert {n: skipped[n] for n in odd} == dict.fromkeys(odd, "not a sha256 name")
    assert skipped[folder.name] == skipped[link.name] == "not a plain file"
    assert skipped[fresh.name].startswith("modified 0 s ago, under --upload-min-age 3600 s")

    assert main(cli(broker, keypair, "gc", "--upload-dir", str(www))) == 0
    out, err = capsys.readouterr()
    assert f"{www}: removed 1 artifacts ({len(b'old bytes')} bytes); kept 2; skipped 7" in out
    assert f"skipped {fresh.name}: modified" in err
    assert not orphan.exists()
    left = {p.name for p in www.iterdir()}
    assert left == {*needed, *odd, fresh.name, folder.name, link.name}
    assert main(cli(broker, keypair, "gc", "--upload-dir", str(www), "--upload-min-age", "0")) == 0
    assert not fresh.exists() and all(p.exists() for p in odd.values())  # young no longer
    assert (www / needed[0]).exists() and (www / needed[1]).exists()


def test_gc_upload_dir_must_be_a_folder(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(cli(broker, keypair, "gc", "--upload-dir", str(tmp_path / "none"))) == 2
    assert "--upload-dir: " in capsys.readouterr().err
