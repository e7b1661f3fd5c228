"""``edge-fleet results`` and ``edge-fleet accuracy``: what the collector stored, read back.

``results`` prints or exports stored predictions: an aligned table for a terminal, JSON
lines, CSV, or Parquet (pyarrow, the ``parquet`` extra) for a data scientist's tools.
Rows come oldest first; with ``--limit N``, the newest N. ``accuracy`` compares the
ground truth posted to devices (``POST /feedback``) with what each model version
predicted. Both read with the database's own connection settings and never write rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from agent.wire.errors import UsageError
from agent.wire.times import parse_rfc3339, rfc3339

from fleet.db import open_database
from fleet.db_schema import RESULTS
from fleet.term import fit_widths, format_row, render_table
from fleet.term import width as term_width

PARQUET_EXTRA = "pip install 'edge-agent[parquet]'"
FORMATS = ("table", "json", "csv", "parquet")
# Numbers right-aligned (SEQ, LATENCY_MS), text left.
_NUMBERS = (2, 6)
# What gives way when the table is wider than the terminal: the prediction and the
# caller's request id (the full values are in --format json/csv).
_ELASTIC = (5, 7)
TABLE_COLUMNS = (
    "TIME", "DEVICE", "SEQ", "MODEL", "VERSION", "PREDICTION", "LATENCY_MS", "REQUEST_ID",
)  # fmt: skip
# Table widths are settled on this many rows at a time: an export of millions of rows
# to a terminal starts at once and never sits in memory whole.
PAGE = 1000
PREDICTION_WIDTH = 40
PARQUET_ROWS_PER_GROUP = 50_000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h|d|w)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
TIME_HELP = "RFC 3339 (2026-05-01T12:00:00Z), a date (UTC), or a duration ago: 30s, 15m, 2h, 7d"


def add_parser(subparsers: Any) -> list[argparse.ArgumentParser]:
    results: argparse.ArgumentParser = subparsers.add_parser(
        "results",
        help="stored predictions: a table, JSON lines, CSV or Parquet",
        description="Read the results the collector stored (edge-fleet collect --db URL).",
    )
    _add_db(results)
    results.add_argument("--device", metavar="ID", help="only this device")
    results.add_argument("--model", metavar="M", help="only this model")
    results.add_argument("--version", metavar="V", help="only this model version")
    results.add_argument("--since", metavar="T", help=f"from this time on (inclusive); {TIME_HELP}")
    results.add_argument("--until", metavar="T", help="before this time (exclusive); same forms")
    results.add_argument(
        "--limit", metavar="N", type=_positive, help="only the newest N (printed oldest first)"
    )
    results.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table (default); json: one object per line, times in epoch seconds; csv:"
        " inputs and outputs as JSON text; parquet: times as UTC timestamps (needs --output"
        f" or a pipe, and pyarrow: {PARQUET_EXTRA})",
    )
    results.add_argument("--json", action="store_true", help="the same as --format json")
    results.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    results.set_defaults(func=run_results)

    accuracy: argparse.ArgumentParser = subparsers.add_parser(
        "accuracy",
        help="live accuracy per model version, from the ground truth posted to devices",
        description="Compare feedback (POST /feedback on a device) with what each model"
        " version predicted, from the collector's database.",
    )
    _add_db(accuracy)
    accuracy.add_argument("--since", metavar="T", help=f"feedback from this time on; {TIME_HELP}")
    accuracy.add_argument("--json", action="store_true", help="one JSON object per line")
    accuracy.set_defaults(func=run_accuracy)
    return [results, accuracy]


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        metavar="URL",
        required=True,
        help="sqlite:///PATH or postgresql://user@host:port/database (the collector's --db)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 or more")
    return value


def parse_time(text: str, flag: str, now: float | None = None) -> float:
    """Epoch seconds of an RFC 3339 time, a date (UTC midnight) or a duration ago."""
    value = text.strip()
    match = _DURATION.fullmatch(value)
    if match:
        ago = float(match.group(1)) * _UNITS[match.group(2)]
        return (time.time() if now is None else now) - ago
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()
        return parse_rfc3339(value).timestamp()
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a time: expected {TIME_HELP}") from None


# --- edge-fleet results --------------------------------------------------------------


def run_results(args: argparse.Namespace) -> int:
    form = "json" if args.json else args.format
    now = time.time()
    since = None if args.since is None else parse_time(args.since, "--since", now)
    until = None if args.until is None else parse_time(args.until, "--until", now)
    if form == "parquet":
        _pyarrow()  # before the database: the missing extra is the first thing to say
        if args.output is None and sys.stdout.isatty():
            raise UsageError(
                "--format parquet: binary output; give --output FILE or redirect stdout"
            )
    db = open_database(args.db, create=False)
    try:
        rows = db.query_results(
            device=args.device,
            model=args.model,
            version=args.version,
            since=since,
            until=until,
            limit=args.limit,
        )
        count = 0

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal count
            for row in rows:
                count += 1
                yield row

        if form == "parquet":
            with _binary_output(args.output) as binary:
                write_parquet(counted(), binary)
        else:
            writer = {"table": write_table, "json": write_json, "csv": write_csv}[form]
            with _text_output(args.output, newline="" if form == "csv" else None) as text:
                writer(counted(), text)
    finally:
        db.close()
    if count == 0 and form == "table":
        print("no stored results match", file=sys.stderr)
    return 0


@contextmanager
def _text_output(path: str | None, *, newline: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline=newline) as out:
        yield out


@contextmanager
def _binary_output(path: str | None) -> Iterator[IO[bytes]]:
    if path is None:
        sys.stdout.flush()
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as out:
        yield out


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _cells(row: dict[str, Any]) -> tuple[str, ...]:
    prediction = "-" if row["prediction"] is None else _compact(row["prediction"])
    if len(prediction) > PREDICTION_WIDTH:
        prediction = prediction[: PREDICTION_WIDTH - 1] + "…"
    latency = row["latency_ms"]
    return (
        rfc3339(row["time"]),
        row["device"],
        str(row["seq"]),
        row["model"],
        row["version"],
        prediction,
        "-" if latency is None else f"{latency:.3f}",
        row["request_id"] or "-",
    )


def write_table(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """Aligned columns; widths grow page by page, never shrink."""
    natural = [len(h) for h in TABLE_COLUMNS]
    header = False
    page: list[tuple[str, ...]] = []

    def flush() -> None:
        nonlocal header
        for cells in page:
            natural[:] = [max(w, len(c)) for w, c in zip(natural, cells, strict=True)]
        widths = fit_widths(natural, TABLE_COLUMNS, term_width(out), shrink=_ELASTIC)
        if not header:
            out.write(format_row(TABLE_COLUMNS, widths, _NUMBERS) + "\n")
            header = True
        for cells in page:
            out.write(format_row(cells, widths, _NUMBERS) + "\n")
        page.clear()

    for row in rows:
        page.append(_cells(row))
        if len(page) >= PAGE:
            flush()
    if page:
        flush()


def write_json(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """One object per line with every column; inputs/outputs/prediction as JSON values."""
    for row in rows:
        out.write(_compact(row) + "\n")


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """A header and one line per result; inputs/outputs/prediction as JSON text."""
    writer = csv.writer(out)
    writer.writerow(RESULTS.names)
    for row in rows:
        writer.writerow(
            "" if row[k] is None else _compact(row[k]) if k in _JSON_KEYS else row[k]
            for k in RESULTS.names
        )


_JSON_KEYS = ("inputs", "outputs", "prediction")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(f"--format parquet needs pyarrow: {PARQUET_EXTRA}") from None
    return pyarrow


def write_parquet(rows: Iterable[dict[str, Any]], out: IO[bytes]) -> None:
    """Parquet, written a row group at a time; times as UTC timestamps (microseconds),
    inputs/outputs/prediction as JSON text."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    stamp = pa.timestamp("us", tz="UTC")
    types = {
        "device": pa.string(), "seq": pa.int64(), "time": stamp, "model": pa.string(),
        "version": pa.string(), "inputs": pa.string(), "outputs": pa.string(),
        "prediction": pa.string(), "latency_ms": pa.float64(), "request_id": pa.string(),
        "stored_at": stamp,
    }  # fmt: skip
    schema = pa.schema([(name, types[name]) for name in RESULTS.names])
    sink = pa.PythonFile(out, mode="w")
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        columns: dict[str, list[Any]] = {name: [] for name in RESULTS.names}

        def flush() -> None:
            writer.write_table(pa.table(columns, schema=schema))
            for values in columns.values():
                values.clear()

        for row in rows:
            for name in RESULTS.names:
                value = row[name]
                if name in _JSON_KEYS:
                    value = None if value is None else _compact(value)
                elif name in ("time", "stored_at"):
                    value = round(value * 1_000_000)
                columns[name].append(value)
            if len(columns["seq"]) >= PARQUET_ROWS_PER_GROUP:
                flush()
        if columns["seq"]:
            flush()  # none at all still makes a valid file: the schema, no row groups


# --- edge-fleet accuracy -------------------------------------------------------------

ACCURACY_COLUMNS = ("MODEL", "VERSION", "FEEDBACK", "LABELLED", "CORRECT", "ACCURACY")


def run_accuracy(args: argparse.Namespace) -> int:
    since = None if args.since is None else parse_time(args.since, "--since")
    db = open_database(args.db, create=False)
    try:
        figures = db.accuracy(since=since)
    finally:
        db.close()
    if args.json:
        for f in figures:
            print(_compact(f))
        return 0
    if not figures:
        print("no feedback joined to a stored result yet", file=sys.stderr)
        return 0
    rows = [
        (
            f["model"],
            f["version"],
            str(f["feedback"]),
            str(f["labelled"]),
            str(f["correct"]),
            "-" if f["accuracy"] is None else f"{f['accuracy']:.4f}",
        )
        for f in figures
    ]
    print(render_table(ACCURACY_COLUMNS, rows, max_width=term_width(), right=(2, 3, 4, 5)))
    return 0
