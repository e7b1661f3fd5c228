"""The simulated devices of bench/fleet.py: one worker process holds many of them.

Each device is what the agent builds for delivery: its own ``MqttClient`` (its own
connection, client id = device id), ``ModelStore`` and ``Registry`` in its own state
folder, an ``Installer`` and ``agent.updates.delivery.Delivery``; so the download (broker
chunks or HTTP), the size and sha256 check, the signature check, the serial check,
parity and activation happen once per device, on the agent's own code.

What devices of one process share, and why (``--own-sessions`` turns the first off):

- the onnxruntime session of an artifact: measured here, loading the ~1 MB forest
  costs ~150 ms of CPU and ~5 MB of RSS per session, so 5000 devices would need ~25 GB
  and ~13 CPU-minutes on this machine's 2 cores, where real devices each have their
  own CPU. The first device of a process to install an artifact loads it; the others
  get a ``LoadedModel`` of their own manifest over that session and still run the
  manifest's parity check on it before they activate.
- on NATS, the broker account: the cluster's one MQTT account (tests/fixtures/nats.py)
  for every device. On mosquitto each device has its own account and ACL block, made
  in one go as ``edge-fleet enroll`` makes them (its device listener takes the client
  id from the username, so a shared account cannot hold two devices).
- the interpreter and its imports, one per process: the paho network thread and the
  delivery worker thread of each device are threads of it. Idle, both wake every
  second (paho's ``loop_forever`` select timeout, the delivery loop's step); measured
  here, 300 idle devices cost 0.3 CPU-seconds a second in GIL hand-offs alone, so 5000
  would need more than this machine's 2 cores to do nothing. The bench stretches both
  idle waits to ``IDLE_WAIT_S``: a message, a publish or a wake still acts at once, a
  keepalive ping is at most that much late (the broker allows 1.5 keepalives).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLEET = "sim"
IDLE_WAIT_S = 5.0
# Hundreds of threads waiting for one GIL each ask for it every switch interval (5 ms by
# default): with that many waiters the hand-offs, not the work, took the CPU here.
SWITCH_INTERVAL_S = 0.05


@dataclass(frozen=True)
class DeviceSpec:
    """What one worker needs to know about its devices and the broker."""

    ids: list[str]
    urls: list[list[str]]  # per device, in failover order
    protocol: str  # "5": mosquitto (the agent's default), "3.1.1": NATS
    accounts: list[tuple[str, str]]  # per device: username, password file
    trusted_key: str
    root: str
    share_sessions: bool


def share_sessions() -> None:
    """Let the installer load each artifact once per process (see the module docstring)."""
    from agent.models import runtime
    from agent.updates import installer
    from agent.wire import parity

    lock = threading.Lock()
    sessions: dict[str, Any] = {}
    load = runtime.load_model

    def shared_load(version_dir: Path, manifest: Any, **threads: int) -> runtime.LoadedModel:
        key = manifest.artifact.sha256
        with lock:
            session = sessions.get(key)
            if session is None:
                session = load(version_dir, manifest, **threads).session
                sessions[key] = session
        parity.check_session(manifest, session)
        return runtime.LoadedModel(manifest, version_dir, session)

    installer.load_model = shared_load  # type: ignore[assignment]


def mqtt_config(spec: DeviceSpec, index: int) -> Any:
    from agent.config import MqttConfig

    urls = spec.urls[index]
    common: dict[str, Any] = {
        "username": spec.accounts[index][0],
        "password_file": spec.accounts[index][1],
        "client_id": spec.ids[index],
        "reconnect_max_s": 5,
    }
    if spec.protocol == "5" and len(urls) == 1:
        return MqttConfig(url=urls[0], **common)
    # MqttConfig.urls and .protocol are issue 14's (agent/config.py).
    try:
        return MqttConfig(urls=urls, protocol=spec.protocol, **common)  # type: ignore[call-arg]
    except TypeError as e:
        raise SystemExit(
            f"agent/config.py MqttConfig has no urls/protocol yet ({e}): NATS devices need "
            "the agent's MQTT 3.1.1 and failover support (issue 14)"
        ) from None


def run_devices(spec: DeviceSpec, events: Any, stop: Any) -> None:
    """One worker process: start a Delivery per device, report what happens to each.

    ``events`` gets ``(kind, device, detail, time)``: ``connected``/``lost`` from the
    link, ``activated`` (detail: version) from the installer, ``event`` (detail: the
    deployment event's name) for what delivery reports on the broker, and one
    ``__ready__`` when every device of this process has been started.
    """
    from agent.config import Config, DeviceConfig, ModelsConfig
    from agent.models.registry import Registry
    from agent.models.store import ModelStore
    from agent.paho_link import MqttClient
    from agent.updates.delivery import Delivery
    from agent.updates.events import Events
    from agent.updates.installer import Change, Installer

    logging.basicConfig(level=logging.ERROR)
    # Below the servers and the operator: thousands of device threads would otherwise
    # starve them of the 2 cores (real devices bring their own CPUs); nice 10 was not
    # enough against 10000 threads (the publish's PUBACK waited over 60 s). SCHED_IDLE
    # runs the devices only on CPU nobody else wants. Threads made from here inherit it.
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if spec.share_sessions:
        share_sessions()
    # Hundreds of threads putting into one multiprocessing queue queue up on its lock
    # (a hand-off can cost a GIL switch interval): a paho thread stuck there misses its
    # keepalive. deque.append needs no lock; one thread ships batches to the parent.
    outbox: deque[tuple[str, str, str, float]] = deque()
    put = outbox.append
    shipped = threading.Event()

    def ship() -> None:
        while True:
            last = shipped.wait(0.25)
            batch = [outbox.popleft() for _ in range(len(outbox))]
            if batch:
                with contextlib.suppress(ValueError):  # closed: the worker is ending
                    events.put(batch)
            if last:
                return

    shipper = threading.Thread(target=ship, name="bench-events", daemon=True)
    shipper.start()

    class Client(MqttClient):
        def start(self) -> None:
            paho = self._client
            # The network thread runs paho's loop_forever (loop_start), or its own loop
            # around paho's loop(1.0) (issue 14's link): both select up to this long.
            paho.loop_forever = functools.partial(paho.loop_forever, timeout=IDLE_WAIT_S)  # type: ignore[method-assign]
            step = paho.loop
            paho.loop = lambda timeout=1.0, *a: step(IDLE_WAIT_S)  # type: ignore[method-assign]
            super().start()

    class Worker(Delivery):
        def _step(self) -> float:
            super()._step()
            return IDLE_WAIT_S

    class ReportedEvents(Events):
        def publish(self, name: str, manifest: Any = None, **fields: Any) -> None:
            super().publish(name, manifest, **fields)
            put(("event", self.device, name, time.time()))

    running: list[tuple[MqttClient, Delivery]] = []
    for index, device in enumerate(spec.ids):
        cfg = Config(
            device=DeviceConfig(id=device, fleet=FLEET),
            mqtt=mqtt_config(spec, index),
            models=ModelsConfig(
                trusted_keys=[spec.trusted_key], probation_s=0, keep_versions=2, delivery_retry_s=5
            ),
            state_dir=str(Path(spec.root) / device),
        )
        cfg.state_path.mkdir(parents=True, exist_ok=True)
        store = ModelStore(cfg.models_path, keep_versions=2)
        installer = Installer(cfg, store, Registry())

        def report(change: Change, device: str = device) -> None:
            put((change.event, device, change.manifest.version, time.time()))

        installer.listeners.append(report)
        client = Client(cfg)
        seen = {"up": False}

        def link(up: bool, device: str = device, seen: dict[str, bool] = seen) -> None:
            if up and not seen["up"]:
                put(("connected", device, "", time.time()))
            elif not up and seen["up"]:
                put(("lost", device, "", time.time()))
            seen["up"] = up

        client.add_connection_listener(link)
        delivery = Worker(cfg, client, installer, store, ReportedEvents(device, client))
        client.start()
        delivery.start()
        running.append((client, delivery))
    put(("__ready__", "", str(len(running)), time.time()))
    stop.wait()
    shipped.set()
    shipper.join(5)
    events.close()
    events.join_thread()  # what was reported reaches the parent
    # No orderly goodbye for thousands of devices (it took minutes): the parent removes
    # the state folders and stops the broker.
    os._exit(0)
