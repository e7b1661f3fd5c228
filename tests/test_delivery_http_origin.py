"""Delivery from an HTTP origin end to end: real mosquitto, real agents, real nginx.

``edge-fleet publish --artifact-url`` (the code behind it, ``fleet.publish``) signs the
URLs into the manifest; the device downloads from nginx with Range requests, verifies
the sha256 and signature as for broker chunks, and falls back to the chunks when the
publisher uploaded them (``--broker-chunks``), else retries and says which URL failed;
a fallback is an ``artifact_fallback`` event. An agent stopped or killed mid-download
resumes from its partial file with a Range request.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from agent.updates.delivery import PAUSE_ENV, PAUSED_FILE
from agent.wire.package import read_manifest
from fleet.publish import publish
from tests.delivery_helpers import (
    device_config,
    events,
    operator,
    predict_version,
    retained_status,
    wait_event,
)
from tests.fixtures.broker import Broker, free_port
from tests.fixtures.models import Keypair
from tests.fixtures.nginx import SLOW_RATE, Nginx
from tests.fleet.publish_helpers import retained

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def artifact(package: Path) -> tuple[str, bytes]:
    art = read_manifest(package).artifact
    return art.sha256, (package / art.file).read_bytes()


def test_an_artifact_from_nginx_installs_with_nothing_retained_but_the_manifest(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, nginx: Nginx
) -> None:
    sha, _ = artifact(iris_package)
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(device_config(broker, keypair, "http-0"))
    signed = publish(operator(broker), iris_package, fleet="f1", key=keypair.key,
                     urls=[nginx.url("{sha256}")], upload_dir=nginx.root)  # fmt: skip
    assert signed[0]["artifact"]["urls"] == [nginx.url(sha)]
    assert signed[0]["artifact"]["broker_chunks"] is False
    status = agent.wait_for(lambda s: s["desired"].get("iris", {}).get("decision") == "activated",
                            timeout=30)  # fmt: skip
    assert predict_version(agent) == "1.0.0"
    verified = wait_event(log, "verified", device="http-0", version="1.0.0")
    assert (verified["artifact_source"], verified["url"]) == ("origin", nginx.url(sha))
    assert status["models"]["iris"]["desired"]["reason"] == f"artifact from {nginx.url(sha)}"
    assert not [e for e in events(log, "http-0") if e["event"] == "artifact_fallback"]
    assert 'edge_model_artifacts_total{model="iris",source="origin"} 1.0' in agent.metrics_text()
    assert [r.status for r in nginx.requests(f"/{sha}")] == [200]
    assert retained(broker, "edge/artifacts/#") == {}


def test_a_wrong_file_on_the_origin_is_refused_by_hash_then_chunks_install(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, nginx: Nginx
) -> None:
    sha, data = artifact(iris_package)
    nginx.put(f"wrong-{sha}", data[::-1])  # the right size, not the right bytes
    wrong, down = nginx.url(f"wrong-{sha}"), f"http://127.0.0.1:{free_port()}/{sha}"
    log = broker.subscribe("edge/devices/+/events")
    statuses = broker.subscribe("edge/devices/http-1/status")
    agent = start_agent(device_config(broker, keypair, "http-1"))
    publish(operator(broker), iris_package, fleet="f1", key=keypair.key,
            urls=[nginx.url("wrong-{sha256}"), down], broker_chunks=True)  # fmt: skip
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)
    assert predict_version(agent) == "1.0.0"
    assert [r.status for r in nginx.requests(f"/wrong-{sha}")] == [200]
    assert f"artifact from {wrong}: sha256 is" in agent.logs()
    assert f"edge/artifacts/{sha}/0" in retained(broker, "edge/artifacts/#")
    # The operator hears of the broken origin from the fleet's events, URL by URL.
    fallback = wait_event(log, "artifact_fallback", device="http-1", version="1.0.0")
    assert (fallback["model"], fallback["sha256"], fallback["artifact_source"]) == (
        "iris", sha, "broker_chunks",
    )  # fmt: skip
    assert [e["url"] for e in fallback["errors"]] == [wrong, down]
    assert fallback["errors"][0]["error"].startswith(f"artifact from {wrong}: sha256 is ")
    assert fallback["errors"][1]["error"].startswith(f"artifact origin {down}: cannot connect")
    assert fallback["reason"].endswith("; broker chunks instead")
    assert wait_event(log, "verified", device="http-1")["artifact_source"] == "broker_chunks"
    # ... and the retained status says which source delivered what serves.
    tried = f"artifact from broker chunks: no origin served it ({wrong}, {down})"
    status = retained_status(
        statuses,
        "http-1",
        lambda s: (s["models"].get("iris", {}).get("desired") or {}).get("decision") == "activated",
    )
    assert status["models"]["iris"]["desired"]["reason"] == tried
    counted = 'edge_model_artifacts_total{model="iris",source="broker_chunks"} 1.0'
    assert counted in agent.metrics_text()


def test_an_origin_that_is_down_is_reported_and_the_file_installs_once_it_appears(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, nginx: Nginx
) -> None:
    sha, data = artifact(iris_package)
    down = f"http://127.0.0.1:{free_port()}/{sha}"
    late = nginx.url(f"late-{sha}")
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(device_config(broker, keypair, "http-2"))
    publish(operator(broker), iris_package, fleet="f1", key=keypair.key, urls=[down, late])
    event = wait_event(log, "rejected", device="http-2", version="1.0.0", retry=True)
    assert f"artifact origin {down}: cannot connect" in event["reason"]
    assert f"artifact origin {late}: HTTP 404" in event["reason"]
    status = agent.wait_for(lambda s: s["models"].get("iris", {}).get("state") == "retrying")
    assert late in status["models"]["iris"]["reason"]
    nginx.put(f"late-{sha}", data)
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)
    assert predict_version(agent) == "1.0.0"
    assert retained(broker, "edge/artifacts/#") == {}


def test_a_download_cut_in_the_middle_resumes_with_a_range_request(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, nginx: Nginx
) -> None:
    sha, data = artifact(iris_package)
    nginx.put(f"cut-{sha}", data)
    agent = start_agent(device_config(broker, keypair, "http-3"))
    nginx.cut_next(after=len(data) // 2)
    publish(operator(broker), iris_package, fleet="f1", key=keypair.key,
            urls=[nginx.relay_url("cut-{sha256}")])  # fmt: skip
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)
    # The cut request may be logged after the resumed one: order them by their Range.
    first, second = sorted(nginx.wait_requests(f"/cut-{sha}", 2), key=lambda r: r.range)
    assert first.range == "" and second.range.startswith("bytes=") and second.status == 206
    assert first.bytes_sent + second.bytes_sent >= len(data) > second.bytes_sent


def test_an_https_origin_is_trusted_through_the_devices_mqtt_ca(
    tls_broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, nginx: Nginx,
    tmp_path: Path,
) -> None:  # fmt: skip
    sha, data = artifact(iris_package)
    nginx.put(f"tls-{sha}", data)
    cfg = device_config(tls_broker, keypair, "http-4")
    bundle = tmp_path / "ca-bundle.crt"  # the broker's CA and the origin's, one file
    bundle.write_bytes(tls_broker.ca.read_bytes() + nginx.ca_file.read_bytes())
    cfg["mqtt"].update(url=tls_broker.tls_url, ca=str(bundle))  # no CA for the origin alone
    agent = start_agent(cfg)
    publish(operator(tls_broker), iris_package, fleet="f1", key=keypair.key,
            urls=[nginx.tls_url("tls-{sha256}")])  # fmt: skip
    agent.wait_for(lambda s: s["models"].get("iris", {}).get("version") == "1.0.0", timeout=30)
    assert [r.status for r in nginx.requests(f"/tls-{sha}")] == [200]


def _part_grows(part: Path, past: int, size: int, timeout: float = 30) -> int:
    """The partial file's size once it holds more than ``past`` bytes (short of ``size``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = part.stat().st_size if part.exists() else 0
        if have > past:
            assert have < size, f"{part}: the download finished before the agent was stopped"
            return have
        time.sleep(0.02)
    raise AssertionError(f"{part}: still at most {past} bytes after {timeout:g} s")


def test_an_agent_stopped_and_killed_mid_download_resumes_from_its_partial_file(
    broker: Broker, keypair: Keypair, start_agent: Any, rf_package: Path, nginx: Nginx
) -> None:
    sha, data = artifact(rf_package)
    size = len(data)
    assert size > 4 * SLOW_RATE, f"the rf artifact ({size} bytes) is too small to stop in"
    nginx.put(f"slow-{sha}", data)
    uri = f"/slow/slow-{sha}"
    agent = start_agent(device_config(broker, keypair, "http-5"))
    part = agent.state_dir / "downloads" / sha / "http.part"
    publish(operator(broker), rf_package, fleet="f1", key=keypair.key,
            urls=[nginx.slow_url("slow-{sha256}")])  # fmt: skip

    # A clean stop (SIGTERM) mid-body: the worker ends the download and keeps the prefix.
    _part_grows(part, past=0, size=size)
    assert agent.stop() == 0
    stopped = part.stat().st_size
    assert 0 < stopped < size
    agent.start()
    # A crash (kill -9) mid-body of the resumed request: what reached the file stays.
    _part_grows(part, past=stopped, size=size)
    agent.kill()
    killed = part.stat().st_size
    agent.start()

    status = agent.wait_for(lambda s: s["desired"].get("rf", {}).get("decision") == "activated",
                            timeout=60)  # fmt: skip
    assert predict_version(agent, [[0.0] * 20]) == "1.0.0"
    # The completed download kept its origin across the restarts.
    assert (
        status["models"]["rf"]["desired"]["reason"]
        == f"artifact from {nginx.slow_url(f'slow-{sha}')}"
    )
    first, second, third = nginx.wait_requests(uri, 3)
    assert first.range == "" and first.status == 200
    # Each start resumes from exactly what the partial file held when the agent went.
    assert (second.range, second.status) == (f"bytes={stopped}-", 206)
    assert (third.range, third.status) == (f"bytes={killed}-", 206)
    sent = first.bytes_sent + second.bytes_sent + third.bytes_sent
    assert size <= sent < 2 * size, f"{sent} bytes sent for a {size}-byte artifact"
    installed = agent.state_dir / "models" / "rf" / "1.0.0" / "model.onnx"
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == sha
    assert not (agent.state_dir / "downloads" / sha).exists()


def test_a_download_complete_before_a_kill_still_names_its_origin(
    broker: Broker, keypair: Keypair, start_agent: Any, iris_package: Path, nginx: Nginx
) -> None:
    sha, data = artifact(iris_package)
    nginx.put(f"done-{sha}", data)
    log = broker.subscribe("edge/devices/+/events")
    agent = start_agent(device_config(broker, keypair, "http-6"), env={PAUSE_ENV: "verify"})
    publish(operator(broker), iris_package, fleet="f1", key=keypair.key,
            urls=[nginx.url("done-{sha256}")], broker_chunks=True)  # fmt: skip
    paused = agent.state_dir / PAUSED_FILE
    deadline = time.monotonic() + 30
    while not paused.exists():
        assert time.monotonic() < deadline, f"never paused:\n{agent.logs()[-3000:]}"
        time.sleep(0.05)
    agent.kill()  # the artifact is complete on disk, not yet verified nor installed
    del agent.env[PAUSE_ENV]
    paused.unlink()
    agent.start()
    status = agent.wait_for(lambda s: s["desired"].get("iris", {}).get("decision") == "activated",
                            timeout=30)  # fmt: skip
    assert (
        status["models"]["iris"]["desired"]["reason"] == f"artifact from {nginx.url(f'done-{sha}')}"
    )
    verified = wait_event(log, "verified", device="http-6")
    assert (verified["artifact_source"], verified["url"]) == ("origin", nginx.url(f"done-{sha}"))
    assert [r.status for r in nginx.requests(f"/done-{sha}")] == [200]  # not fetched again
