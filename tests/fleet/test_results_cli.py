"""edge-fleet results and accuracy on both engines, run as the command line runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.wire.times import rfc3339
from fleet.cli import main
from fleet.db import open_database
from tests.fleet.db_rows import T0, feedback, result, store

EDGE_FLEET = str(Path(sys.executable).with_name("edge-fleet"))


@pytest.fixture
def stored(db_url: str) -> str:
    """pi-1: three iris results (one of 2.0.0), one labelled; pi-2: one wine result."""
    db = open_database(db_url)
    try:
        store(
            db, "pi-1",
            result(1, request_id="req-1"), result(2, prediction=[0, 2]),
            result(3, version="2.0.0"), feedback(4, 1, request_id="req-1"),
        )  # fmt: skip
        store(db, "pi-2", result(1, model="wine", t=T0 + 2.5))
    finally:
        db.close()
    return db_url


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_is_aligned_for_a_terminal(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "results", "--db", stored)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == [
        "TIME", "DEVICE", "SEQ", "MODEL", "VERSION", "PREDICTION", "LATENCY_MS", "REQUEST_ID",
    ]  # fmt: skip
    assert [line.split()[:3] for line in lines] == [
        [rfc3339(T0 + 1), "pi-1", "1"],
        [rfc3339(T0 + 2), "pi-1", "2"],
        [rfc3339(T0 + 2.5), "pi-2", "1"],
        [rfc3339(T0 + 3), "pi-1", "3"],
    ]
    assert lines[0].split()[3:] == ["iris", "1.0.0", "[1]", "0.250", "req-1"]
    assert lines[1].split()[5] == "[0,2]" and lines[1].split()[7] == "-"
    # Aligned: every column starts where its header does.
    starts = [header.index(h) for h in ("DEVICE", "MODEL", "VERSION", "PREDICTION")]
    for line in lines:
        assert all(line[s - 2 : s] == "  " and line[s] != " " for s in starts)


def test_json_lines_carry_every_column(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "results", "--db", stored, "--format", "json", "--device", "pi-1")
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["seq"] for o in objects] == [1, 2, 3]
    first = objects[0]
    assert set(first) == {
        "device", "seq", "time", "model", "version", "inputs", "outputs", "prediction",
        "latency_ms", "request_id", "stored_at",
    }  # fmt: skip
    assert first["time"] == T0 + 1 and first["inputs"] == [[5.1, 3.5, 1.4, 0.2]]
    assert first["outputs"]["prediction"] == [1] and first["request_id"] == "req-1"
    code, again, _ = run(capsys, "results", "--db", stored, "--json", "--device", "pi-1")
    assert again == out


def test_csv_has_a_header_and_json_text(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "results", "--db", stored, "--format", "csv", "--model", "iris")
    assert code == 0
    records = list(csv.DictReader(io.StringIO(out)))
    assert [(r["device"], r["seq"]) for r in records] == [
        ("pi-1", "1"),
        ("pi-1", "2"),
        ("pi-1", "3"),
    ]
    assert json.loads(records[1]["outputs"]) == {
        "prediction": [0, 2],
        "probabilities": [[0.9, 0.1]],
    }
    assert json.loads(records[0]["inputs"]) == [[5.1, 3.5, 1.4, 0.2]]
    assert records[1]["request_id"] == "" and float(records[0]["time"]) == T0 + 1


def test_parquet_reads_back_with_pyarrow(stored: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    target = tmp_path / "results.parquet"
    assert main(["results", "--db", stored, "--format", "parquet", "--output", str(target)]) == 0
    table = pq.read_table(target)
    assert table.num_rows == 4
    assert str(table.schema.field("time").type) == "timestamp[us, tz=UTC]"
    rows = table.to_pylist()
    assert [(r["device"], r["seq"]) for r in rows] == [
        ("pi-1", 1),
        ("pi-1", 2),
        ("pi-2", 1),
        ("pi-1", 3),
    ]
    assert rows[0]["time"].timestamp() == pytest.approx(T0 + 1)
    assert json.loads(rows[1]["prediction"]) == [0, 2] and rows[3]["version"] == "2.0.0"


def test_parquet_to_a_pipe(stored: str) -> None:
    import pyarrow.parquet as pq

    done = subprocess.run(
        [EDGE_FLEET, "results", "--db", stored, "--format", "parquet", "--limit", "1"],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert pq.read_table(io.BytesIO(done.stdout)).to_pylist()[0]["seq"] == 3


def test_parquet_refuses_a_terminal(stored: str) -> None:
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [EDGE_FLEET, "results", "--db", stored, "--format", "parquet"],
            stdout=follower, stderr=subprocess.PIPE, check=False, timeout=60,
        )  # fmt: skip
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert b"--output FILE" in done.stderr


def test_filters_and_limit(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    def seqs(*args: str) -> list[tuple[str, int]]:
        code, out, err = run(capsys, "results", "--db", stored, "--json", *args)
        assert code == 0, err
        return [(o["device"], o["seq"]) for o in map(json.loads, out.splitlines())]

    assert seqs("--version", "2.0.0") == [("pi-1", 3)]
    assert seqs("--model", "wine") == [("pi-2", 1)]
    assert seqs("--since", rfc3339(T0 + 2), "--until", rfc3339(T0 + 3)) == [
        ("pi-1", 2),
        ("pi-2", 1),
    ]
    assert seqs("--limit", "2") == [("pi-2", 1), ("pi-1", 3)]
    assert seqs("--since", "15m") == []  # the rows are from 2026-09, long before now
    assert len(seqs("--until", "1h")) == 4


def test_nothing_matches(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "results", "--db", stored, "--device", "nobody")
    assert code == 0 and out.startswith("TIME") is False and "no stored results match" in err


@pytest.mark.parametrize("flag", ["--since", "--until"])
def test_a_bad_time_names_the_flag_and_value(
    stored: str, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    code, _, err = run(capsys, "results", "--db", stored, flag, "yesterday")
    assert code == 2
    assert f"{flag}: 'yesterday' is not a time" in err and "15m" in err


def test_parquet_without_pyarrow_names_the_extra(
    stored: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    code, _, err = run(
        capsys, "results", "--db", stored, "--format", "parquet", "-o", str(tmp_path / "x")
    )
    assert code == 2
    assert "pip install 'edge-agent[parquet]'" in err
    assert not (tmp_path / "x").exists()


def test_a_missing_sqlite_file_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "results", "--db", f"sqlite:///{tmp_path}/typo.db")
    assert code == 2 and "no such database file" in err
    assert not (tmp_path / "typo.db").exists()


def test_output_file(stored: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out.csv"
    code, out, _ = run(capsys, "results", "--db", stored, "--format", "csv", "-o", str(target))
    assert code == 0 and out == ""
    assert len(target.read_text().splitlines()) == 5


def test_accuracy_per_model_version(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "accuracy", "--db", stored)
    assert code == 0, err
    header, line = out.splitlines()
    assert header.split() == ["MODEL", "VERSION", "FEEDBACK", "LABELLED", "CORRECT", "ACCURACY"]
    assert line.split() == ["iris", "1.0.0", "1", "1", "1", "1.0000"]
    code, out, _ = run(capsys, "accuracy", "--db", stored, "--json")
    assert json.loads(out) == {
        "model": "iris", "version": "1.0.0", "feedback": 1, "labelled": 1, "correct": 1,
        "accuracy": 1.0,
    }  # fmt: skip
    code, out, err = run(capsys, "accuracy", "--db", stored, "--since", "1d")
    assert code == 0 and out == "" and "no feedback" in err


def test_the_command_runs_as_installed(stored: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [EDGE_FLEET, "results", "--db", stored, "--limit", "1"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[1:3] == ["pi-1", "3"]
    assert time.monotonic() - started < 10
