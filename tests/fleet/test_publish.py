"""``edge-fleet publish``/``rollout``/``rollback``/``gc`` against a real mosquitto.

What the operator sees (exit code, stdout, stderr) and what the broker retains
afterwards (the signed desired manifest, the chunks, the history), read back with a
plain MQTT client.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.wire.manifest import parse_manifest
from agent.wire.signing import key_id, load_public_key, verify_signature
from fleet.cli import main
from fleet.retained import Session
from tests.delivery_helpers import operator
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair
from tests.fleet.publish_helpers import cli, desired, retained


def test_publish_uploads_chunks_and_retains_a_signed_desired_manifest(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1",
               "--rollout", "25", "--chunk-size", "256")  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "iris 1.0.0: desired for fleet f1 (serial 1, rollout 25%)" in out
    assert "uploading" in err
    body = desired(broker)
    manifest = parse_manifest(body)
    pub = load_public_key(keypair.pub)
    assert verify_signature(manifest, {key_id(pub): pub}) == key_id(pub)
    assert body["rollout"] == {"percent": 25, "salt": "f1/iris"}  # inside the signature
    assert manifest.artifact.chunk_size == 256 and manifest.artifact.chunks == 3
    chunks = retained(broker, f"edge/artifacts/{manifest.artifact.sha256}/+")
    data = b"".join(chunks[f"edge/artifacts/{manifest.artifact.sha256}/{i}"] for i in range(3))
    assert data == (iris_package / "model.onnx").read_bytes()


def test_republishing_skips_the_upload_and_raises_the_serial(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1")) == 0
    capsys.readouterr()
    assert main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1")) == 0
    _out, err = capsys.readouterr()
    assert "is already on the broker" in err and "uploading" not in err
    assert desired(broker)["serial"] == 2
    # A device-specific publish must also outrank every serial a device may have seen.
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--device", "d9")
    assert main(args) == 0
    topic = "edge/devices/d9/models/iris/desired"
    body = json.loads(retained(broker, topic)[topic])
    assert body["serial"] == 3 and "rollout" not in body


def test_rollout_re_signs_with_a_new_percent_and_serial(
    broker: Broker, keypair: Keypair, iris_package: Path
) -> None:
    main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--rollout", "10"))
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "50")) == 0
    body = desired(broker)
    assert (body["rollout"]["percent"], body["serial"], body["version"]) == (50, 2, "1.0.0")
    topic = "edge/fleets/f1/models/iris/history"
    entries = json.loads(retained(broker, topic)[topic])["entries"]
    assert [(e["version"], e["serial"]) for e in entries] == [("1.0.0", 2)]  # one per artifact


def test_rollback_and_its_refusals(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert main(cli(broker, keypair, "rollback", "iris", "--fleet", "f1")) == 1
    assert (
        "iris: nothing is published for fleet f1; nothing to roll back" in capsys.readouterr().err
    )
    main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1"))
    main(cli(broker, keypair, "publish", str(iris_package_v2), "--fleet", "f1"))
    capsys.readouterr()
    assert main(cli(broker, keypair, "rollback", "iris", "--fleet", "f1", "--to", "7.0")) == 1
    err = capsys.readouterr().err
    assert "no version 7.0 in the history of fleet f1 (published: 1.0.0, 1.1.0)" in err
    assert main(cli(broker, keypair, "rollback", "iris", "--fleet", "f1")) == 0
    body = desired(broker)
    assert (body["version"], body["serial"]) == ("1.0.0", 3)


def test_two_versions_of_one_artifact_both_stay_in_the_history(
    broker: Broker, keypair: Keypair, iris_package: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # 1.0.1 only changes the manifest (same model.onnx): the history was keyed by the
    # artifact alone, so 1.0.1 replaced 1.0.0 and nothing was left to roll back to.
    patch = tmp_path / "iris-1.0.1"
    shutil.copytree(iris_package, patch)
    manifest = json.loads((patch / "manifest.json").read_text())
    manifest["version"] = "1.0.1"
    manifest.pop("signature", None)
    (patch / "manifest.json").write_text(json.dumps(manifest))
    assert main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1")) == 0
    assert main(cli(broker, keypair, "publish", str(patch), "--fleet", "f1")) == 0
    assert main(cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "50")) == 0
    topic = "edge/fleets/f1/models/iris/history"
    entries = json.loads(retained(broker, topic)[topic])["entries"]
    assert [(e["version"], e["serial"]) for e in entries] == [("1.0.0", 1), ("1.0.1", 3)]
    capsys.readouterr()
    assert main(cli(broker, keypair, "rollback", "iris", "--fleet", "f1")) == 0
    assert "rolled back to 1.0.0" in capsys.readouterr().out
    assert desired(broker)["version"] == "1.0.0"


def test_gc_clears_artifacts_nothing_names_and_keeps_the_rest(
    broker: Broker, keypair: Keypair, iris_package: Path, iris_package_v2: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1"))
    main(cli(broker, keypair, "publish", str(iris_package_v2), "--fleet", "f1"))
    s = Session(operator(broker), "test")
    s.wait([s.publish("edge/artifacts/" + "ab" * 32 + "/0", b"orphan")], "orphan")
    s.close()
    capsys.readouterr()
    assert main(cli(broker, keypair, "gc", "--dry-run")) == 0
    assert "would clear 1 artifacts (1 chunks); kept 2" in capsys.readouterr().out
    assert main(cli(broker, keypair, "gc")) == 0
    left = {t.split("/")[2] for t in retained(broker, "edge/artifacts/#")}
    assert "ab" * 32 not in left and len(left) == 2


def test_a_device_account_is_refused_with_the_brokers_reason(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = broker.add_device("d1", "f1")
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", creds=device)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "refused it: Not authorized (reason 135" in err


def test_a_spoiled_package_is_refused_before_anything_is_sent(
    broker: Broker, keypair: Keypair, iris_package: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(iris_package, pkg)
    (pkg / "model.onnx").write_bytes(b"x" + (pkg / "model.onnx").read_bytes()[1:])
    assert main(cli(broker, keypair, "publish", str(pkg), "--fleet", "f1")) == 1
    assert "model.onnx: sha256 is" in capsys.readouterr().err
    assert retained(broker, "edge/#") == {}


def test_usage_errors_exit_2(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--rollout", "150")
    assert main(args) == 2
    assert "--rollout/--percent: 150 is not 0..100" in capsys.readouterr().err
    assert main(cli(broker, keypair, "publish", str(iris_package), "--fleet", "a/b")) == 2


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_tar_of_a_package_is_a_package(
    broker: Broker, keypair: Keypair, iris_package: Path, tmp_path: Path, suffix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import tarfile

    archive = tmp_path / f"iris-1.0.0{suffix}"
    with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tar:
        tar.add(iris_package, arcname="iris-1.0.0")  # a folder inside, as `tar cf` makes it
    assert main(cli(broker, keypair, "publish", str(archive), "--fleet", "f1")) == 0
    assert "iris 1.0.0: desired for fleet f1 (serial 1" in capsys.readouterr().out
    sha = desired(broker)["artifact"]["sha256"]
    chunks = retained(broker, f"edge/artifacts/{sha}/+")
    assert b"".join(chunks.values()) == (iris_package / "model.onnx").read_bytes()


def test_a_tar_that_is_not_a_package_says_so(
    broker: Broker, keypair: Keypair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "pkg.tar"
    junk.write_bytes(b"not a tar at all")
    assert main(cli(broker, keypair, "publish", str(junk), "--fleet", "f1")) == 1
    err = capsys.readouterr().err
    assert "pkg.tar: not a package folder or readable .tar" in err and "internal" not in err


def test_where_is_signed_into_the_rollout_and_kept_by_a_rollout(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--rollout", "50",
               "--where", "ring=canary", "--where", "site=north")  # fmt: skip
    assert main(args) == 0
    assert "(serial 1, rollout 50% where ring=canary,site=north)" in capsys.readouterr().out
    body = desired(broker)
    assert body["rollout"] == {"percent": 50, "salt": "f1/iris",
                               "where": {"ring": "canary", "site": "north"}}  # fmt: skip
    pub = load_public_key(keypair.pub)
    verify_signature(parse_manifest(body), {key_id(pub): pub})  # inside the signature
    rollout = cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "100")
    assert main(rollout) == 0
    assert desired(broker)["rollout"]["where"] == {"ring": "canary", "site": "north"}
    assert main([*rollout, "--where", "ring=stable"]) == 0
    assert desired(broker)["rollout"]["where"] == {"ring": "stable"}
    assert main([*rollout, "--no-where"]) == 0
    assert "where" not in desired(broker)["rollout"]
    capsys.readouterr()
    assert main([*args, "--where", "ring"]) == 2
    assert "--where: 'ring' is not TAG=VALUE" in capsys.readouterr().err
    device = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1",
                 "--device", "d1", "--where", "ring=canary")  # fmt: skip
    assert main(device) == 2


def test_publish_and_rollout_json(
    broker: Broker, keypair: Keypair, iris_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli(broker, keypair, "publish", str(iris_package), "--fleet", "f1", "--json",
               "--chunk-size", "256", "--rollout", "10")  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert "desired for fleet f1" in err  # the result line moved to stderr
    assert (doc["model"], doc["version"], doc["uploaded"], doc["chunks"]) == (
        "iris",
        "1.0.0",
        True,
        3,
    )
    (pub,) = doc["published"]
    assert pub["topic"] == "edge/fleets/f1/models/iris/desired" and pub["serial"] == 1
    assert pub["rollout"]["percent"] == 10 and doc["warnings"][0].startswith("fleet f1 is not")
    rollout = cli(broker, keypair, "rollout", "iris", "--fleet", "f1", "--percent", "20", "--json")
    assert main(rollout) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["published"][0]["serial"] == 2 and doc["published"][0]["rollout"]["percent"] == 20
