"""Fleet simulation: N devices running the agent's own delivery code against one mosquitto.

    .venv/bin/python bench/fleet.py [--devices 500] [--processes 4] [--first 10]

Each simulated device is what the agent builds for delivery: its own ``MqttClient``
(client id = device id), ``ModelStore`` and ``Registry`` in its own state folder, an
``Installer`` and ``agent.updates.delivery.Delivery``, so download, verification, onnxruntime
load, parity and activation all really happen, once per device. Devices are spread
over a few processes (threads inside each). To keep the set-up short they log in with
the operator account instead of 500 device accounts (the ACL is not what is measured).

The run publishes a signed iris model to the fleet with ``--first`` percent, waits until
the devices whose bucket is below it serve it, holds a few seconds to catch any other
device taking it, then rolls out to 100% and times until every device serves it.
Goals (issue 5): exactly the bucketed share in stage one; all devices within 60 s of
the 100% publish.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package: keep bench/ off the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import logging
import multiprocessing as mp
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLEET = "sim"
MODEL = "iris"
HOLD_S = 5.0
GOAL_S = 60.0


def run_devices(
    ids: list[str], url: str, user: str, password_file: str, pub: str, root: str,
    events: Any, stop: Any,
) -> None:  # fmt: skip
    """One worker process: start a Delivery per device id, report activations."""
    from agent.config import Config, DeviceConfig, ModelsConfig, MqttConfig
    from agent.models.registry import Registry
    from agent.models.store import ModelStore
    from agent.paho_link import MqttClient
    from agent.updates.delivery import Delivery
    from agent.updates.events import Events
    from agent.updates.installer import Change, Installer

    logging.basicConfig(level=logging.ERROR)
    running: list[tuple[MqttClient, Delivery]] = []
    for device in ids:
        cfg = Config(
            device=DeviceConfig(id=device, fleet=FLEET),
            mqtt=MqttConfig(
                url=url,
                username=user,
                password_file=password_file,
                client_id=device,
                reconnect_max_s=5,
            ),
            models=ModelsConfig(trusted_keys=[pub], probation_s=0, keep_versions=2),
            state_dir=str(Path(root) / device),
        )
        cfg.state_path.mkdir(parents=True, exist_ok=True)
        store = ModelStore(cfg.models_path, keep_versions=2)
        installer = Installer(cfg, store, Registry())

        def report(change: Change, device: str = device) -> None:
            events.put((device, change.event, change.manifest.version, time.time()))

        installer.listeners.append(report)
        client = MqttClient(cfg)
        delivery = Delivery(cfg, client, installer, store, Events(device, client))
        client.start()
        delivery.start()
        running.append((client, delivery))
    for client, _ in running:
        client.wait_connected(60)
    events.put(("__ready__", "", str(len(running)), time.time()))
    stop.wait()
    for client, delivery in running:
        delivery.stop()
        client.stop(timeout=0.5)


def rss_mb(pids: list[int]) -> float:
    import psutil

    return sum(psutil.Process(p).memory_info().rss for p in pids) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--first", type=float, default=10.0, help="stage one percent")
    args = parser.parse_args()

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from agent.wire.signing import generate_keypair, load_private_key
    from agent.wire.topics import in_rollout
    from converter.package import build_package
    from fleet.publish import publish, rollout
    from tests.delivery_helpers import operator
    from tests.fixtures.broker import Broker

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    key, pub = generate_keypair(tmp / "keys")
    x, y = load_iris(return_X_y=True)
    package = build_package(
        LogisticRegression(max_iter=500).fit(x, y), name=MODEL, version="2.0.0",
        out_dir=tmp / "package", private_key=load_private_key(key),
    )  # fmt: skip
    broker = Broker()
    ids = [f"sim-{i:04d}" for i in range(args.devices)]
    expected_first = {d for d in ids if in_rollout(f"{FLEET}/{MODEL}", d, args.first)}

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    stop = ctx.Event()
    procs = []
    t_start = time.monotonic()
    for p in range(args.processes):
        share = ids[p :: args.processes]
        proc = ctx.Process(
            target=run_devices,
            args=(share, broker.url, broker.operator.username,
                  str(broker.operator.password_file), str(pub), str(tmp / "devices"),
                  events, stop),
        )  # fmt: skip
        proc.start()
        procs.append(proc)
    activated: dict[str, float] = {}

    def drain(until: float, want: int | None = None) -> None:
        while time.time() < until and (want is None or len(activated) < want):
            try:
                device, event, version, at = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event == "activated" and version == "2.0.0":
                activated.setdefault(device, at)

    ready = 0
    while ready < args.processes:
        device, _, _count, _ = events.get(timeout=300)
        ready += device == "__ready__"
    print(f"{args.devices} devices in {args.processes} processes connected in "
          f"{time.monotonic() - t_start:.1f} s; RSS {rss_mb([p.pid for p in procs if p.pid]):.0f} MB")  # fmt: skip

    try:
        ops = operator(broker)
        t1 = time.time()
        publish(ops, package, fleet=FLEET, percent=args.first, key=key)
        drain(t1 + GOAL_S, want=len(expected_first))
        first_done = max(activated.values(), default=t1) - t1
        drain(time.time() + HOLD_S)
        stage1 = set(activated)
        exact = stage1 == expected_first
        print(f"stage 1 ({args.first:g}%): {len(stage1)} devices serve 2.0.0, bucketed "
              f"{len(expected_first)}; {'exactly the bucketed set' if exact else 'MISMATCH'}; "
              f"all in {first_done:.2f} s")  # fmt: skip

        t2 = time.time()
        rollout(ops, MODEL, fleet=FLEET, percent=100, key=key)
        drain(t2 + GOAL_S * 2, want=args.devices)
        # Devices of stage one re-activate (new serial) without a download; count the rest.
        rest = {d: at for d, at in activated.items() if d not in stage1}
        took = max(rest.values(), default=t2) - t2
        converged = len(activated)
        ok = exact and converged == args.devices and took < GOAL_S
        print(f"stage 2 (100%): {converged}/{args.devices} devices serve 2.0.0, the last "
              f"{took:.2f} s after the rollout (goal < {GOAL_S:g} s) {'OK' if ok else 'MISSED'}")  # fmt: skip
        print(f"RSS of the device processes: {rss_mb([p.pid for p in procs if p.pid]):.0f} MB")
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        broker.cleanup()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
