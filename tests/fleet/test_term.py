"""fleet/term.py: tables within 80 columns, progress on and off a terminal."""

from __future__ import annotations

import io

import pytest

from fleet.term import Progress, render_table, width


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_table_that_fits_is_left_whole() -> None:
    text = render_table(("A", "BB"), [("x", "yyy"), ("long cell", "z")])
    assert text.splitlines() == ["A          BB", "x          yyy", "long cell  z"]


def test_a_wide_table_is_narrowed_to_80_columns_with_an_ellipsis() -> None:
    rows = [("pi-001", "m " * 60, "active"), ("pi-002", "short", "rejected: " + "r" * 70)]
    text = render_table(("DEVICE", "MODELS", "REASON"), rows)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    assert lines[1].startswith("pi-001  ")
    assert "…" in lines[1] and "…" in lines[2]
    assert lines[0].split() == ["DEVICE", "MODELS", "REASON"]


def test_numbers_align_right() -> None:
    text = render_table(("N", "X"), [("1", "a"), ("100", "b")], right=(0,))
    assert text.splitlines()[1] == "  1  a"


def test_columns_env_sets_the_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert width(io.StringIO()) == 120
    monkeypatch.delenv("COLUMNS")
    assert width(io.StringIO()) == 80


def test_progress_outside_a_terminal_is_plain_lines_at_most_every_few_seconds() -> None:
    out = io.StringIO()
    now = [0.0]
    bar = Progress("uploading", 100, unit=str, out=out, clock=lambda: now[0])
    for i in range(1, 101):
        now[0] = i * 0.1  # 10 s in all
        bar.update(i)
    bar.done()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "#" not in out.getvalue()
    assert lines[0] == "uploading: 1/100"
    assert 2 <= len(lines) - 1 <= 3, lines  # one line per 5 s, then the end
    assert lines[-1].startswith("uploading: 100 in 10.0 s")


def test_progress_on_a_terminal_redraws_one_bar() -> None:
    out = _Tty()
    now = [0.0]
    bar = Progress("uploading", 10, unit=str, out=out, clock=lambda: now[0])
    for i in range(1, 11):
        now[0] = i * 0.2
        bar.update(i)
    bar.done()
    text = out.getvalue()
    assert text.count("\r") == 10 and "[" + "#" * 30 + "]" in text
    assert text.endswith("\nuploading: 10 in 2.0 s\n")
