"""What edge-fleet prints: tables that fit the terminal, progress, JSON documents.

Every command prints its result on stdout (a table, or with ``--json`` one JSON
document) and its messages on stderr, so ``edge-fleet status --json | jq`` and
``edge-fleet publish ... 2>log`` both work. Progress goes to stderr too: a redrawn bar
on a terminal; outside one (a CI log, journald) a plain line at most every
``PLAIN_EVERY_S`` seconds and at the end, so a log is neither silent nor flooded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, TextIO

DEFAULT_WIDTH = 80
PLAIN_EVERY_S = 5.0
GAP = "  "
ELLIPSIS = "…"


def width(out: IO[str] | None = None) -> int:
    """The terminal's width, or 80 when ``out`` is not a terminal (a pipe, a file).

    ``COLUMNS`` wins, as in every POSIX tool, so a test or a wide log can ask."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    out = out or sys.stdout
    if out.isatty():
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


def _shorten(cell: str, limit: int) -> str:
    if len(cell) <= limit:
        return cell
    return cell[: max(0, limit - 1)] + ELLIPSIS if limit > 0 else ""


def fit_widths(
    natural: Sequence[int],
    columns: Sequence[str],
    max_width: int = DEFAULT_WIDTH,
    shrink: Sequence[int] | None = None,
) -> list[int]:
    """Column widths within ``max_width``: the widest of the ``shrink`` columns (default:
    all) is narrowed one character at a time (never below its header or 6 characters).
    A table that wraps is unreadable; a shortened cell (see ``format_row``) still says
    what it is, but a shortened time or id does not: those stay out of ``shrink``."""
    widths = list(natural)
    floor = [max(len(c), 6) for c in columns]
    candidates = list(range(len(widths)) if shrink is None else shrink)
    while sum(widths) + len(GAP) * (len(widths) - 1) > max_width:
        i = max(candidates, key=lambda k: widths[k] - floor[k])
        if widths[i] <= floor[i]:
            break  # nothing left to narrow: wider than the terminal, but whole
        widths[i] -= 1
    return widths


def format_row(cells: Sequence[str], widths: Sequence[int], right: Sequence[int] = ()) -> str:
    """One line of a table: cells padded (``right``: aligned right) or shortened with an
    ellipsis to their width; the last column is not padded."""
    parts = [
        _shorten(c, w).rjust(w) if i in right else _shorten(c, w).ljust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return GAP.join(parts).rstrip()


def render_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    max_width: int = DEFAULT_WIDTH,
    right: Sequence[int] = (),
) -> str:
    """Aligned columns within ``max_width`` (``fit_widths``); ``right`` lists the
    columns aligned right (numbers)."""
    table = [list(columns), *([str(c) for c in r] for r in rows)]
    natural = [max(len(r[i]) for r in table) for i in range(len(columns))]
    widths = fit_widths(natural, columns, max_width)
    return "\n".join(format_row(r, widths, right) for r in table)


def print_json(obj: Any, out: TextIO | None = None) -> None:
    """One JSON document on stdout (indented; ``--json`` output is for people and jq)."""
    out = out or sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    out.flush()


class Progress:
    """Progress of ``total`` units on stderr: a bar on a terminal, plain lines elsewhere.

    ``unit`` formats an amount (bytes as MB by default); ``update(done)`` may be called
    as often as wanted, it draws at most every 0.1 s on a terminal."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: Callable[[float], str] | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total = label, total
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.unit = unit or (lambda n: f"{n / 1e6:.1f} MB")
        self.clock = clock
        self.start = clock()
        self._drawn = float("-inf")
        self.done_units = 0

    def update(self, done: int) -> None:
        self.done_units = done
        now = self.clock()
        every = 0.1 if self.tty else PLAIN_EVERY_S
        if now - self._drawn < every:
            return
        self._drawn = now
        if self.tty:
            filled = int(30 * done / max(1, self.total))
            bar = "#" * filled + "-" * (30 - filled)
            self.out.write(f"\r{self.label} [{bar}] {self.unit(done)}/{self.unit(self.total)}")
        else:
            self.out.write(f"{self.label}: {self.unit(done)}/{self.unit(self.total)}\n")
        self.out.flush()

    def done(self, note: str = "") -> None:
        took = self.clock() - self.start
        end = "\n" if self.tty and self._drawn > float("-inf") else ""
        tail = f" {note}" if note else ""
        self.out.write(f"{end}{self.label}: {self.unit(self.total)} in {took:.1f} s{tail}\n")
        self.out.flush()
