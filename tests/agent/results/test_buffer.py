"""The SQLite result buffer: durable, bounded, counted, never in the way of serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import BufferConfig
from agent.results.buffer import BufferCollector, Result, ResultBuffer
from tests.fixtures.disk import fill_disk
from tests.fixtures.rows import all_rows


def result(i: int = 0, *, at: float | None = None, payload: int = 0) -> Result:
    return Result(
        time=time.time() if at is None else at,
        model="iris",
        version="1.0.0",
        inputs=[[float(i), 1.0, 2.0, "x" * payload]],
        outputs=["setosa"],
        latency_ms=0.2,
    )


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[ResultBuffer]:
    b = ResultBuffer(tmp_path / "buffer.db", BufferConfig())
    yield b
    b.close()


def test_records_come_back_in_order_with_increasing_seq(buffer: ResultBuffer) -> None:
    seqs = [buffer.record(result(i)) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    rows = buffer.take_batch(10)
    assert [r.seq for r in rows] == seqs
    assert rows[0].model == "iris" and rows[0].outputs == '["setosa"]'
    assert buffer.take_batch(2, after=3)[0].seq == 4


def test_seq_is_never_reused_after_rows_are_sent_and_the_buffer_reopened(tmp_path: Path) -> None:
    b = ResultBuffer(tmp_path / "b.db", BufferConfig())
    for i in range(3):
        b.record(result(i))
    b.mark_sent_range(1, 3)
    assert b.stats().rows == 0
    b.close()
    b = ResultBuffer(tmp_path / "b.db", BufferConfig())
    assert b.record(result()) == 4
    b.close()


def test_group_commit_writes_concurrent_results_in_fewer_transactions(tmp_path: Path) -> None:
    b = ResultBuffer(tmp_path / "b.db", BufferConfig())
    commits: list[str] = []
    b._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    threads, per_thread = 16, 50
    barrier = threading.Barrier(threads)
    seqs: list[int | None] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for i in range(per_thread):
            s = b.record(result(i))
            with lock:
                seqs.append(s)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = threads * per_thread
    assert sorted(s for s in seqs if s is not None) == list(range(1, total + 1))
    assert b.stats().rows == total
    # Every record returned only after its commit, yet far fewer commits than records.
    assert len(commits) < total * 0.8
    b.close()


def test_max_rows_drops_oldest_and_counts_it(tmp_path: Path) -> None:
    b = ResultBuffer(tmp_path / "b.db", BufferConfig(max_rows=10))
    for i in range(25):
        b.record(result(i))
    stats = b.stats()
    assert stats.rows == 10
    assert stats.dropped["max_rows"] == 15
    assert [r.seq for r in b.take_batch(100)] == list(range(16, 26))
    b.close()
    # Drop counts survive a restart.
    b = ResultBuffer(tmp_path / "b.db", BufferConfig(max_rows=10))
    assert b.stats().dropped["max_rows"] == 15
    b.close()


def test_max_bytes_drops_oldest(tmp_path: Path) -> None:
    b = ResultBuffer(tmp_path / "b.db", BufferConfig(max_bytes=65536))
    for i in range(100):
        b.record(result(i, payload=2000))
    stats = b.stats()
    assert stats.bytes <= 65536
    assert stats.dropped["max_bytes"] > 0
    assert stats.rows + stats.dropped["max_bytes"] == 100
    assert b.take_batch(1)[0].seq == 100 - stats.rows + 1
    b.close()


def test_max_age_expires_old_results(tmp_path: Path) -> None:
    b = ResultBuffer(tmp_path / "b.db", BufferConfig(max_age=60))
    old = time.time() - 3600
    for i in range(5):
        b.record(result(i, at=old))
    b._bounds.next_age_check = 0  # the check runs at most once a second; make it due now
    b.record(result(99))
    stats = b.stats()
    assert stats.dropped["max_age"] == 5
    assert stats.rows == 1
    assert stats.oldest_age_s is not None and stats.oldest_age_s < 60
    b.close()


def test_sampling_and_none(tmp_path: Path) -> None:
    none = ResultBuffer(tmp_path / "n.db", BufferConfig(record="none"))
    assert none.record(result()) is None
    assert none.stats().rows == 0
    none.close()
    sample = ResultBuffer(tmp_path / "s.db", BufferConfig(record="sample", sample_rate=0.25))
    kept = sum(sample.record(result(i)) is not None for i in range(2000))
    assert 350 < kept < 650
    sample.close()


def test_batched_durability_returns_before_commit_and_close_flushes(tmp_path: Path) -> None:
    cfg = BufferConfig(durability="batched", flush_interval_ms=60_000)
    b = ResultBuffer(tmp_path / "b.db", cfg)
    for i in range(10):
        assert b.record(result(i)) == i + 1
    assert b.take_batch(100) == []  # not committed yet: that is the loss window
    b.close()
    b = ResultBuffer(tmp_path / "b.db", cfg)
    assert b.stats().rows == 10
    b.close()


def test_metrics_show_backlog_and_drops(tmp_path: Path) -> None:
    b = ResultBuffer(tmp_path / "b.db", BufferConfig(max_rows=2))
    registry = CollectorRegistry()
    registry.register(BufferCollector(b))
    for i in range(5):
        b.record(result(i))
    text = generate_latest(registry).decode()
    assert "edge_buffer_rows 2.0" in text
    assert 'edge_buffer_dropped_total{reason="max_rows"} 3.0' in text
    b.close()


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agent.results.buffer import Result, ResultBuffer
    from agent.config import BufferConfig
    b = ResultBuffer(Path(sys.argv[1]), BufferConfig())
    i = 0
    while True:
        seq = b.record(Result(time.time(), "m", "1", [[i]], [i], 0.1))
        print(seq, flush=True)
        i += 1
    """
)


def test_kill_9_loses_no_committed_result(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.stdout is not None
    acknowledged = [int(proc.stdout.readline()) for _ in range(500)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    b = ResultBuffer(db, BufferConfig())
    stored = {r.seq for r in all_rows(b)}
    assert set(acknowledged) <= stored
    b.close()


def test_full_disk_drops_and_counts_never_raises_and_loses_nothing_stored(
    tiny_disk: Path,
) -> None:
    b = ResultBuffer(tiny_disk / "b.db", BufferConfig())
    stored = [b.record(result(i, payload=1000)) for i in range(200)]
    assert None not in stored
    filler = tiny_disk / "someone-elses-log"
    fill_disk(filler)

    outcomes = [b.record(result(i, payload=1000)) for i in range(300)]  # never raises
    stats = b.stats()
    assert stats.dropped.get("disk_full", 0) > 0
    assert outcomes.count(None) == stats.dropped["disk_full"]
    # Forwarded rows may not be deletable now; they stay (sent again, dropped by seq).
    sent = [r.seq for r in all_rows(b)]
    deleted = b.mark_sent_range(sent[0], sent[49])
    assert {r.seq for r in all_rows(b)} >= set(sent[50:])
    if not deleted:
        assert [r.seq for r in all_rows(b)][:50] == sent[:50]

    filler.unlink()  # room again: deleting and recording work as before
    assert b.mark_sent_range(sent[0], sent[-1])
    assert b.stats().rows == 0
    assert b.record(result(0)) is not None
    b.close()
