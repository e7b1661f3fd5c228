"""Bad deliveries change nothing, and a kill -9 at any step is survived.

Real mosquitto and real ``edge-agent run`` processes. Every bad delivery is published
to an agent serving iris 1.0.0: afterwards it still serves 1.0.0 and its ``rejected``
event says exactly what was wrong. The kill tests pause the agent's delivery worker at
one step (``EDGE_DELIVERY_PAUSE_AT``, which writes ``delivery-paused`` in the state
folder), SIGKILL it there and restart it without the pause.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.disk import sha256_file
from agent.updates.delivery import PAUSE_ENV, PAUSED_FILE
from agent.updates.download import LOG_FILE, PartialDownload
from agent.wire.manifest import Artifact
from agent.wire.package import read_manifest
from agent.wire.signing import load_private_key, sign_manifest
from fleet.publish import publish
from fleet.retained import Session, Target, sign_desired, upload_artifact
from tests.delivery_helpers import device_config, operator, predict_version, serving, wait_event
from tests.fixtures.broker import Broker
from tests.fixtures.models import Keypair

# Real agents delivering over a real broker: `make test-fast` leaves them out.
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
def session(broker: Broker) -> Iterator[Session]:
    s = Session(operator(broker), "test")
    yield s
    s.close()


def _desired(session: Session, device: str, body: bytes) -> None:
    topic = Target(device=device).desired(session.topics, "iris")
    session.wait([session.publish(topic, body)], "desired")


def _signed(package: Path, keypair: Keypair, serial: int = 50, **changes: Any) -> dict[str, Any]:
    body = read_manifest(package).to_dict()
    body.update(changes)
    return sign_desired(body, serial=serial, chunk_size=256, target=Target(device="x"),
                        percent=100, key=keypair.key)  # fmt: skip


def _spoiled(src: Path, dst: Path, keypair: Keypair, *, onnx: bytes | None = None,
             parity_shift: float = 0.0) -> Path:  # fmt: skip
    """A signed package whose model will not load, or whose parity vectors are wrong."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst).to_dict()
    if onnx is not None:
        (dst / "model.onnx").write_bytes(onnx)
        manifest["artifact"] = {**manifest["artifact"], "size": len(onnx),
                                "sha256": sha256_file(dst / "model.onnx")}  # fmt: skip
    if parity_shift:
        probs = np.asarray(manifest["parity"]["expected"]["probabilities"]) + parity_shift
        manifest["parity"]["expected"]["probabilities"] = probs.tolist()
    signed = sign_manifest(manifest, load_private_key(keypair.key))
    (dst / "manifest.json").write_text(json.dumps(signed))
    return dst


def _upload(session: Session, package: Path, chunk_size: int = 256) -> None:
    m = read_manifest(package)
    upload_artifact(session, package / m.artifact.file, m.artifact.sha256, chunk_size)


# (case id, how to deliver it, the text the rejected event must hold)
Deliver = Callable[[Session, Path, Path, Keypair, Path], None]


def _not_json(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    _desired(s, "bad-0", b'{"name": "iris", "version": ')


def _bad_signature(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    _upload(s, v2)
    body = _signed(v2, kp)
    body["version"] = "9.9.9"  # changed after signing
    _desired(s, "bad-0", json.dumps(body).encode())


def _unsigned(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    _upload(s, v2)
    body = _signed(v2, kp)
    del body["signature"]
    _desired(s, "bad-0", json.dumps(body).encode())


def _corrupt_chunk(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    _upload(s, v2)
    sha = read_manifest(v2).artifact.sha256
    chunk = bytearray((v2 / "model.onnx").read_bytes()[256:512])
    chunk[10] ^= 0xFF
    s.wait([s.publish(s.topics.artifact_chunk(sha, 1), bytes(chunk))], "corrupt chunk")
    _desired(s, "bad-0", json.dumps(_signed(v2, kp)).encode())


def _missing_chunk(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    _upload(s, v2)
    sha = read_manifest(v2).artifact.sha256
    s.wait([s.publish(s.topics.artifact_chunk(sha, 1), b"")], "clear chunk")
    _desired(s, "bad-0", json.dumps(_signed(v2, kp)).encode())


def _wrong_hash(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    # The manifest names v2's sha256, but the chunks under it hold other bytes.
    m = read_manifest(v2)
    other = tmp / "other.bin"
    other.write_bytes(bytes(m.artifact.size))
    upload_artifact(s, other, m.artifact.sha256, 256)
    _desired(s, "bad-0", json.dumps(_signed(v2, kp)).encode())


def _replayed(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    _upload(s, v2)
    # Below the serial the agent accepted for 1.0.0 (1): a validly signed old manifest.
    _desired(s, "bad-0", json.dumps(_signed(v2, kp, serial=0)).encode())


def _disk_short(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    # A signed manifest for an artifact larger than any disk here: refused before download.
    m = read_manifest(v2)
    body = _signed(v2, kp, artifact={**m.to_dict()["artifact"], "size": 10**15})
    _desired(s, "bad-0", json.dumps(body).encode())


def _will_not_load(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    pkg = _spoiled(v2, tmp / "noload", kp, onnx=b"this is not an onnx model" * 20)
    publish(s.options, pkg, fleet="f1", devices=["bad-0"], key=kp.key, chunk_size=256)


def _parity(s: Session, v1: Path, v2: Path, kp: Keypair, tmp: Path) -> None:
    pkg = _spoiled(v2, tmp / "parity", kp, parity_shift=0.3)
    publish(s.options, pkg, fleet="f1", devices=["bad-0"], key=kp.key, chunk_size=256)


BAD: list[tuple[str, Deliver, str]] = [
    ("not-json", _not_json, "not valid JSON"),
    ("bad-signature", _bad_signature, "signature: does not match"),
    ("unsigned", _unsigned, "not signed"),
    ("corrupt-chunk", _corrupt_chunk, "sha256 is"),
    ("missing-chunk", _missing_chunk, "missing chunk 1"),
    ("wrong-hash", _wrong_hash, "the manifest says " ),
    ("replayed-serial", _replayed,
     "is not above the last accepted serial 1; publish it again: `edge-fleet publish PACKAGE`"),
    ("disk-too-small", _disk_short, "bytes free, the artifact"),
    ("onnx-will-not-load", _will_not_load, "onnxruntime cannot load"),
    ("parity-fails", _parity, "parity"),
]  # fmt: skip


@pytest.mark.parametrize(("deliver", "expect"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_delivery_is_rejected_and_the_old_model_keeps_serving(
    deliver: Deliver, expect: str, broker: Broker, keypair: Keypair, start_agent: Any,
    session: Session, iris_package: Path, iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(device_config(broker, keypair, "bad-0"), packages=[iris_package])
    deliver(session, iris_package, iris_package_v2, keypair, tmp_path)
    event = wait_event(log, "rejected", device="bad-0", timeout=30)
    assert expect in event["reason"], event
    assert serving(agent) == "1.0.0"
    assert predict_version(agent) == "1.0.0"
    status = agent.status()["models"]["iris"]
    # Serving 1.0.0 still, and saying the desired version was refused (or is retried).
    assert status["version"] == "1.0.0"
    if event["retry"]:
        assert status["state"] == "retrying"
        assert status["reason"].startswith("delivery of 1.1.0 failed for now: ")
    else:
        assert status["state"] == "rejected"
        assert status["reason"].startswith("delivery of ") and " refused: " in status["reason"]
    assert status["desired"]["decision"] == ("retrying" if event["retry"] else "rejected")


def test_unsigned_is_taken_only_with_allow_unsigned(
    broker: Broker, keypair: Keypair, start_agent: Any, session: Session,
    iris_package: Path, iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    cfg = device_config(broker, keypair, "bad-0", allow_unsigned=True)
    agent = start_agent(cfg, packages=[iris_package])
    _unsigned(session, iris_package, iris_package_v2, keypair, tmp_path)
    agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)


def test_chunk_that_never_arrives_is_retried_once_it_does(
    broker: Broker, keypair: Keypair, start_agent: Any, session: Session,
    iris_package: Path, iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(device_config(broker, keypair, "bad-0"), packages=[iris_package])
    _missing_chunk(session, iris_package, iris_package_v2, keypair, tmp_path)
    event = wait_event(log, "rejected", device="bad-0", timeout=30)
    assert event["retry"] is True
    assert "missing chunk 1 of artifact" in event["reason"]
    _upload(session, iris_package_v2)  # the operator re-uploads: the retry completes
    agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    # The retry asked only for what was missing: the other chunks were kept on disk.
    downloading = [json.loads(m.payload) for m in log.messages]
    chunks = read_manifest(iris_package_v2).artifact.size // 256 + 1
    assert [e["have"] for e in downloading if e["event"] == "downloading"] == [0, chunks - 1]


# --- kill -9 at each step ----------------------------------------------------------


def _wait_paused(agent: Any, timeout: float = 30) -> str:
    marker: Path = agent.state_dir / PAUSED_FILE
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, f"never paused:\n{agent.logs()[-3000:]}"
        time.sleep(0.05)
    return marker.read_text()


@pytest.mark.parametrize("step", ["chunk:4", "verify", "verified", "install", "activated"])
def test_kill_9_during_delivery_resumes_and_serves_a_verified_version(
    step: str, broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    cfg = device_config(broker, keypair, "kill-0")
    agent = start_agent(cfg, packages=[iris_package], env={PAUSE_ENV: step})
    publish(operator(broker), iris_package_v2, fleet="f1", key=keypair.key, chunk_size=64)
    assert _wait_paused(agent) == step
    agent.kill()

    art = read_manifest(iris_package_v2).artifact
    chunked = Artifact(art.file, art.size, art.sha256, 64)
    progress = agent.state_dir / "downloads" / art.sha256 / LOG_FILE
    have = {int(x) for x in progress.read_text().split()}
    assert len(have) == (4 if step == "chunk:4" else chunked.chunks)
    # Killed after the activation: the new version is what comes back, nothing else.
    first = "1.1.0" if step == "activated" else "1.0.0"

    del agent.env[PAUSE_ENV]
    (agent.state_dir / PAUSED_FILE).unlink()
    agent.start(wait=False)
    agent.wait_serving()
    assert predict_version(agent) in {first, "1.1.0"}  # a complete version, at once
    agent.wait_for(lambda s: s["models"]["iris"]["version"] == "1.1.0", timeout=30)
    assert predict_version(agent) == "1.1.0"
    downloading = [json.loads(m.payload) for m in log.messages]
    downloading = [e for e in downloading if e["event"] == "downloading"]
    if step == "chunk:4":
        assert [e["have"] for e in downloading] == [0, 4]  # resumed, not started over
    else:
        assert len(downloading) == 1  # complete on disk: straight to verification
    leftover = agent.state_dir / "downloads" / art.sha256
    deadline = time.monotonic() + 10
    while leftover.exists() and time.monotonic() < deadline:  # cleaned after activation
        time.sleep(0.05)
    assert not leftover.exists()


def test_partial_download_keeps_only_logged_chunks(tmp_path: Path) -> None:
    art = Artifact("model.onnx", 1000, "0" * 64, 300)
    dl = PartialDownload(tmp_path, art)
    assert dl.write(1, b"b" * 300)
    assert not dl.write(1, b"b" * 300)
    with pytest.raises(Exception, match="chunk 3: 99 bytes, expected 100"):
        dl.write(3, b"d" * 99)
    with (dl.log).open("a") as f:
        f.write("2")  # a torn last line, as a crash mid-append leaves it
    again = PartialDownload(tmp_path, art)
    assert again.have == {1}
    assert again.missing() == [0, 2, 3]


def test_broker_restart_mid_download_resumes_on_reconnect(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path,
    iris_package_v2: Path, tmp_path: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    cfg = device_config(broker, keypair, "bad-0", delivery_chunk_timeout_s=60)
    agent = start_agent(cfg, packages=[iris_package])
    s = Session(operator(broker), "test")
    _missing_chunk(s, iris_package, iris_package_v2, keypair, tmp_path)
    s.close()
    wait_event(log, "downloading", device="bad-0")
    broker.stop()
    assert predict_version(agent) == "1.0.0"  # serving does not wait for the broker
    broker.start()
    s = Session(operator(broker), "test")
    m = read_manifest(iris_package_v2)
    chunk = (iris_package_v2 / "model.onnx").read_bytes()[256:512]
    s.wait([s.publish(s.topics.artifact_chunk(m.artifact.sha256, 1), chunk)], "chunk 1")
    s.close()
    agent.wait_for(lambda st: st["models"]["iris"]["version"] == "1.1.0", timeout=30)
    kinds = [json.loads(x.payload)["event"] for x in log.messages]
    assert "rejected" not in kinds
    assert kinds.count("downloading") == 1  # one download, carried across the reconnect


def test_a_signed_manifest_named_with_dots_never_leaves_the_model_store(
    broker: Broker, keypair: Keypair, start_agent: Any, session: Session,
    iris_package: Path, iris_package_v2: Path,
) -> None:  # fmt: skip
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(device_config(broker, keypair, "dots-0"), packages=[iris_package])
    _upload(session, iris_package_v2)
    for name in ("..", ".", ".lock"):
        topic = f"edge/devices/dots-0/models/{name}/desired"
        body = _signed(iris_package_v2, keypair, name=name)
        session.wait([session.publish(topic, json.dumps(body).encode())], "desired")
        event = wait_event(log, "rejected", device="dots-0", model=name, timeout=30)
        assert f"name: {name!r} is not a plain name" in event["reason"]
    state = agent.state_dir
    assert sorted(p.name for p in (state / "models").iterdir() if p.is_dir()) == ["iris"]
    assert not (state / "active.json").exists() and not (state / "1.1.0").exists()
    assert not (state.parent / "1.1.0").exists()
    assert serving(agent) == "1.0.0"
