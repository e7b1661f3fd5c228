"""Database benchmark: results/s through ``fleet.db`` into SQLite and PostgreSQL.

    .venv/bin/python bench/db_store.py [--stores 60] [--devices 20] [--only sqlite,postgresql]

Rows as the collector gets them: result objects built by the agent's own
``payloads.result_json`` (4 float inputs, ``{"prediction": [1]}``, a latency), decoded
from the message text with ``json.loads``. Each store() takes 5 messages of 1000 rows
from 5 of ``--devices`` devices; ``--stores`` of them run one after another into one
database (so the tables and their indexes grow to 300,000 rows by default), then the
last 5 messages are stored again (a redelivery: every row a duplicate).

Printed per engine: rows/s of ``Batch.add_results`` (the collector's MQTT thread),
of ``store()`` (its writer thread) and of both in a row, plus the duplicate pass. The
PostgreSQL server is a throw-away cluster (tests/fixtures/postgres.py) with its
default durability (fsync on, synchronous_commit on); SQLite runs in WAL with
synchronous=NORMAL, as ``fleet.db`` opens it. Goals (issue 12): >= 50,000 results/s
into SQLite and >= 20,000/s into PostgreSQL, store() alone; exits 1 when missed.
"""

from __future__ import annotations

import os
import sys

# Keep bench/ off the import path (bench/http.py would shadow the standard library).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.wire import payloads  # noqa: E402
from fleet.db import Batch, open_database  # noqa: E402

GOALS = {"sqlite": 50_000.0, "postgresql": 20_000.0}
ROWS_PER_MESSAGE = 1000
MESSAGES_PER_STORE = 5
WARMUP_STORES = 3


def message(device: str, first: int, rng: random.Random) -> list[dict[str, Any]]:
    """One results message as the collector decodes it."""
    now = time.time()
    objects = [
        payloads.result_json(
            first + i,
            t=now + i * 1e-4,
            model="iris",
            version="1.0.0",
            inputs=json.dumps([[round(rng.uniform(0, 8), 6) for _ in range(4)]]),
            outputs=json.dumps({"prediction": [rng.randrange(3)]}),
            latency_ms=round(rng.uniform(0.05, 0.5), 6),
        )
        for i in range(ROWS_PER_MESSAGE)
    ]
    raw = payloads.results_head(device) + ",".join(objects).encode() + payloads.RESULTS_TAIL
    rows: list[dict[str, Any]] = payloads.check_results(json.loads(raw), "bench")["results"]
    return rows


def plan(stores: int, devices: int) -> list[list[tuple[str, list[dict[str, Any]]]]]:
    rng = random.Random(12)
    seq = dict.fromkeys((f"device-{d:03d}" for d in range(devices)), 1)
    names = list(seq)
    out = []
    for s in range(stores):
        batch = []
        for m in range(MESSAGES_PER_STORE):
            device = names[(s * MESSAGES_PER_STORE + m) % devices]
            batch.append((device, message(device, seq[device], rng)))
            seq[device] += ROWS_PER_MESSAGE
        out.append(batch)
    return out


def run(url: str, work: list[list[tuple[str, list[dict[str, Any]]]]]) -> dict[str, float]:
    db = open_database(url)
    add_s = store_s = 0.0
    rows = 0
    for i, messages in enumerate(work):
        t0 = time.perf_counter()
        batch = Batch()
        for device, msg in messages:
            batch.add_results(device, msg)
        t1 = time.perf_counter()
        report = db.store(batch)
        t2 = time.perf_counter()
        assert report.inserted == len(batch), report
        if i >= WARMUP_STORES:
            add_s += t1 - t0
            store_s += t2 - t1
            rows += len(batch)
    batch = Batch()
    for device, msg in work[-1]:
        batch.add_results(device, msg)
    t0 = time.perf_counter()
    report = db.store(batch)
    dup_s = time.perf_counter() - t0
    assert report.inserted == 0 and report.duplicates == len(batch), report
    db.close()
    return {
        "add": rows / add_s,
        "store": rows / store_s,
        "both": rows / (add_s + store_s),
        "duplicates": len(batch) / dup_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=60)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--only", default="sqlite,postgresql")
    args = parser.parse_args()
    engines = args.only.split(",")
    work = plan(args.stores, args.devices)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="edge-bench-db-") as tmp:
        if "sqlite" in engines:
            figures["sqlite"] = run(f"sqlite:///{tmp}/bench.db", work)
        if "postgresql" in engines:
            from tests.fixtures.postgres import Postgres

            server = Postgres(settings={"fsync": "on"})
            try:
                server.start()
                figures["postgresql"] = run(server.create_database(), work)
            finally:
                server.close()
    total = (args.stores - WARMUP_STORES) * MESSAGES_PER_STORE * ROWS_PER_MESSAGE
    print(f"{total} rows per engine after {WARMUP_STORES} warm-up stores; rows/s:")
    print(f"{'engine':12} {'add_results':>12} {'store()':>10} {'both':>10} {'duplicates':>11}")
    missed = False
    for engine, f in figures.items():
        print(
            f"{engine:12} {f['add']:12,.0f} {f['store']:10,.0f} {f['both']:10,.0f}"
            f" {f['duplicates']:11,.0f}"
        )
    for engine, f in figures.items():
        ok = f["store"] >= GOALS[engine]
        missed |= not ok
        verdict = "ok" if ok else "MISSED"
        print(f"{engine} store(): {f['store']:,.0f}/s (goal >= {GOALS[engine]:,.0f}/s) {verdict}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
