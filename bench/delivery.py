"""Publish-to-serving time over MQTT on loopback, for a ~1 MB and a ~50 MB forest.

    .venv/bin/python bench/delivery.py [--sizes 1,50] [--runs 3]

For each size: trains a forest sized to fit (RandomForest for 1 MB, ExtraTrees for
50 MB), converts and signs it with the real converter, starts a real mosquitto from
broker-config/ and a real ``edge-agent run`` subprocess trusting the key, then times
``fleet.publish.publish`` (the code behind ``edge-fleet publish``: upload of retained
chunks, PUBACKs, signed desired manifest) until the agent's /status says it serves the
new version, i.e. downloaded, verified, loaded, parity-checked and activated. Each run
publishes a new version (a new artifact: the upload is never skipped). Goals (issue 5):
1 MB under 2 s, 50 MB under 15 s.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package: keep bench/ off the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.wire.signing import generate_keypair, load_private_key  # noqa: E402
from fleet.publish import publish  # noqa: E402
from tests.delivery_helpers import operator  # noqa: E402
from tests.fixtures.agent import RunningAgent, dump_toml, free_port  # noqa: E402
from tests.fixtures.broker import Broker  # noqa: E402

GOALS_S = {1: 2.0, 50: 15.0}


def forest(size_mb: int, seed: int) -> Any:
    from sklearn.datasets import make_classification
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    if size_mb <= 5:
        x, y = make_classification(n_samples=2000, n_features=20, n_informative=8, random_state=0)
        trees = max(1, round(90 * size_mb))
        return RandomForestClassifier(
            n_estimators=trees, max_depth=12, random_state=seed, n_jobs=2
        ).fit(x, y)
    x, y = make_classification(n_samples=20000, n_features=20, n_informative=8, random_state=0)
    trees = max(1, round(3.9 * size_mb))  # ~0.26 MB of ONNX per fully grown tree here
    return ExtraTreesClassifier(n_estimators=trees, random_state=seed, n_jobs=2).fit(x, y)


def build(size_mb: int, run: int, out: Path, key: Path) -> Path:
    from converter.package import build_package

    return build_package(
        forest(size_mb, seed=run), name=f"forest{size_mb}", version=f"1.0.{run}",
        out_dir=out / f"forest{size_mb}-{run}", private_key=load_private_key(key),
        serial=1,
    )  # fmt: skip


def start_agent(broker: Broker, tmp: Path, pub: Path) -> RunningAgent:
    creds = broker.add_device("bench-0", "bench")
    state = tmp / "agent-state"
    config = {
        "state_dir": str(state),
        "device": {"id": "bench-0", "fleet": "bench"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "mqtt": broker.mqtt_settings(creds),
        "models": {"trusted_keys": [str(pub)], "probation_s": 0, "keep_versions": 2},
        "buffer": {"record": "none"},
    }
    path = tmp / "agent.toml"
    path.write_text(dump_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return RunningAgent(path, state, env).start()


def time_one(broker: Broker, agent: RunningAgent, package: Path, key: Path) -> dict[str, float]:
    manifest = json.loads((package / "manifest.json").read_text())
    name, version = manifest["name"], manifest["version"]
    t0 = time.perf_counter()
    publish(operator(broker), package, fleet="bench", key=key)
    published = time.perf_counter() - t0
    deadline = t0 + 120
    while time.perf_counter() < deadline:
        model = agent.status()["models"].get(name, {})
        if model.get("version") == version and model.get("state") == "active":
            return {"publish_s": published, "serving_s": time.perf_counter() - t0}
        time.sleep(0.01)
    raise TimeoutError(f"{name} {version} not serving after 120 s:\n{agent.logs()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,50", help="model sizes in MB (default 1,50)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--autosave-changes", type=int, default=1,
        help="mosquitto autosave_interval in changes (broker-config's default 1 saves the "
        "whole retained store after every chunk: uploads slow down as artifacts accumulate)",
    )  # fmt: skip
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as d:
        tmp = Path(d)
        key, pub = generate_keypair(tmp / "keys")
        broker = Broker(autosave_changes=args.autosave_changes)
        agent = start_agent(broker, tmp, pub)
        try:
            for size in sizes:
                runs = []
                for run in range(args.runs):
                    package = build(size, run, tmp / "packages", key)
                    mb = (package / "model.onnx").stat().st_size / 1e6
                    runs.append(time_one(broker, agent, package, key))
                    print(f"  {size} MB model ({mb:.1f} MB): publish {runs[-1]['publish_s']:.2f} s,"
                          f" serving after {runs[-1]['serving_s']:.2f} s", file=sys.stderr)  # fmt: skip
                best = min(r["serving_s"] for r in runs)
                median = statistics.median(r["serving_s"] for r in runs)
                goal = GOALS_S.get(size)
                verdict = "" if goal is None else (" OK" if median < goal else " MISSED")
                ok &= not verdict.endswith("MISSED")
                print(f"{size:>3} MB ({mb:.1f} MB ONNX): publish-to-serving median {median:.2f} s,"
                      f" best {best:.2f} s over {len(runs)} runs"
                      + (f" (goal < {goal:g} s){verdict}" if goal else ""))  # fmt: skip
        finally:
            agent.stop()
            broker.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
