"""Halt and promote conditions of a self-driving rollout: ``rejected>2% or rolled_back>1%``.

Grammar (``and`` binds tighter than ``or``; parentheses group)::

    expr    := conj ("or" conj)*
    conj    := atom ("and" atom)*
    atom    := METRIC OP NUMBER ["%"] | "agreement" OP NUMBER ["%"] "over" ROWS | "(" expr ")"
    OP      := > | >= | < | <= | ==

A metric is a state of ``fleet/progress.py`` (active, probation, updating, rejected,
rolled_back, not_in_rollout, offline, unknown) counted over the devices the current
step targets. ``NUMBER%`` compares the metric's share of those devices, a bare number
its count. ``agreement>=0.97 over 1000`` weighs the shadow comparison the targeted
devices report in their retained status (``models[name].shadow``: rows compared and
agreed): the label agreement over all of them, which holds only once at least ``ROWS``
rows were compared (so a few lucky rows never promote a candidate). A mistake is a ``UsageError`` naming the token and where it stands, so a
typo in ``--halt-if`` fails before anything is published.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.wire.errors import UsageError

from fleet.progress import STATES, Summary

METRICS = STATES
AGREEMENT = "agreement"
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_TOKEN = re.compile(
    r"\s*(?:(>=|<=|==|>|<)|(\d+(?:\.\d+)?(?:\s*%)?)|([A-Za-z_][A-Za-z0-9_]*)|([()])|(\S))"
)


@dataclass(frozen=True)
class Verdict:
    holds: bool
    why: str  # the figures that decided it: "rejected 3/40 = 7.5% > 2%"


@dataclass(frozen=True)
class Compare:
    metric: str
    op: str
    value: float
    percent: bool

    def evaluate(self, s: Summary) -> Verdict:
        n = s.count(self.metric)
        want = f"{self.value:g}{'%' if self.percent else ''}"
        if self.percent:
            share = s.share(self.metric)
            holds = OPERATORS[self.op](share, self.value)
            shown = f"{self.metric} {n}/{s.total} = {share:.3g}%"
        else:
            holds = OPERATORS[self.op](n, self.value)
            shown = f"{self.metric} {n}"
        op = self.op if holds else _NEGATED[self.op]
        return Verdict(holds, f"{shown} {op} {want}")

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}{'%' if self.percent else ''}"


@dataclass(frozen=True)
class Agreement:
    """``agreement OP VALUE over ROWS``: the shadow candidate's label agreement."""

    op: str
    value: float  # a fraction (0.97); ``97%`` is parsed into the same
    over: int

    def evaluate(self, s: Summary) -> Verdict:
        compared, agreed = s.shadow_compared, s.shadow_agreed
        want = f"{self.value:g} over {self.over}"
        if compared < self.over:
            return Verdict(False, f"agreement over {compared} compared rows, {self.over} needed")
        share = agreed / compared
        holds = OPERATORS[self.op](share, self.value)
        op = self.op if holds else _NEGATED[self.op]
        return Verdict(holds, f"agreement {agreed}/{compared} = {share:.4g} {op} {want}")

    def __str__(self) -> str:
        return f"{AGREEMENT}{self.op}{self.value:g} over {self.over}"


_NEGATED = {">": "<=", ">=": "<", "<": ">=", "<=": ">", "==": "!="}


@dataclass(frozen=True)
class Junction:
    word: str  # "and" | "or"
    parts: tuple[Expr, ...]

    def evaluate(self, s: Summary) -> Verdict:
        verdicts = [p.evaluate(s) for p in self.parts]
        holds = (
            all(v.holds for v in verdicts) if self.word == "and" else any(v.holds for v in verdicts)
        )
        # Say what decided: for a true "or" the parts that hold, for a false "and" the
        # parts that fail; otherwise every part was needed.
        decisive = [v for v in verdicts if v.holds == holds]
        if (self.word == "and") == holds:
            decisive = verdicts
        return Verdict(holds, f" {self.word} ".join(v.why for v in decisive))

    def __str__(self) -> str:
        # Only an "or" inside an "and" needs parentheses to read back the same.
        return f" {self.word} ".join(
            f"({p})" if isinstance(p, Junction) and p.word == "or" else str(p) for p in self.parts
        )


Expr = Compare | Agreement | Junction


def parse(text: str, flag: str = "expression") -> Expr:
    """The condition ``text``; ``UsageError`` naming the offending token otherwise."""
    tokens = _tokens(text, flag)
    parser = _Parser(text, tokens, flag)
    expr = parser.expr()
    if parser.i < len(tokens):
        parser.fail("unexpected")
    return expr


def _tokens(text: str, flag: str) -> list[tuple[str, str, int]]:
    """(kind, token, offset) for each token: op, number, word, paren."""
    out: list[tuple[str, str, int]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m is not None  # the last alternative matches any non-space character
        group = m.lastindex or 5  # the alternatives are exclusive: one group matched
        kind = ("op", "number", "word", "paren", "bad")[group - 1]
        token, at = m.group(group), m.start(group)
        if kind == "bad":
            hint = " (write == for equality)" if token in "=!" else ""
            raise UsageError(f"{flag}: unexpected {token!r} at column {at + 1} of {text!r}{hint}")
        out.append((kind, token, at))
        pos = m.end()
    if not out:
        raise UsageError(f"{flag}: empty condition (e.g. 'rejected>2% or rolled_back>1%')")
    return out


class _Parser:
    def __init__(self, text: str, tokens: list[tuple[str, str, int]], flag: str) -> None:
        self.text, self.tokens, self.flag, self.i = text, tokens, flag, 0

    def fail(self, what: str, expected: str = "") -> None:
        if self.i < len(self.tokens):
            _, token, at = self.tokens[self.i]
            where = f"{token!r} at column {at + 1}"
        else:
            where = "the end"
        tail = f", expected {expected}" if expected else ""
        raise UsageError(f"{self.flag}: {what} {where} of {self.text!r}{tail}")

    def peek(self) -> tuple[str, str]:
        if self.i < len(self.tokens):
            kind, token, _ = self.tokens[self.i]
            return kind, token.lower() if kind == "word" else token
        return "end", ""

    def expr(self) -> Expr:
        parts = [self.conj()]
        while self.peek() == ("word", "or"):
            self.i += 1
            parts.append(self.conj())
        return parts[0] if len(parts) == 1 else Junction("or", tuple(parts))

    def conj(self) -> Expr:
        parts = [self.atom()]
        while self.peek() == ("word", "and"):
            self.i += 1
            parts.append(self.atom())
        return parts[0] if len(parts) == 1 else Junction("and", tuple(parts))

    def atom(self) -> Expr:
        kind, token = self.peek()
        if (kind, token) == ("paren", "("):
            self.i += 1
            inner = self.expr()
            if self.peek() != ("paren", ")"):
                self.fail("unclosed '(':", "')'")
            self.i += 1
            return inner
        if kind != "word" or token in ("and", "or"):
            self.fail("unexpected", "a metric (" + ", ".join((*METRICS, AGREEMENT)) + ")")
        if token == AGREEMENT:
            return self.agreement()
        if token not in METRICS:
            self.fail("unknown metric", "one of " + ", ".join((*METRICS, AGREEMENT)))
        self.i += 1
        kind, op = self.peek()
        if kind != "op":
            self.fail(f"after {token}: unexpected", "one of > >= < <= ==")
        self.i += 1
        kind, number = self.peek()
        if kind != "number":
            self.fail(f"after {token}{op}: unexpected", "a number, or a share like 2%")
        self.i += 1
        percent = number.endswith("%")
        value = float(number.rstrip("%").strip())
        if percent and value > 100:
            self.i -= 1
            self.fail("a share over 100%:")
        return Compare(token, op, value, percent)

    def agreement(self) -> Agreement:
        self.i += 1
        kind, op = self.peek()
        if kind != "op":
            self.fail("after agreement: unexpected", "one of > >= < <= ==")
        self.i += 1
        kind, number = self.peek()
        if kind != "number":
            self.fail(f"after agreement{op}: unexpected", "a share like 0.97 or 97%")
        value = float(number.rstrip("%").strip())
        value = value / 100 if number.endswith("%") else value
        if not 0 <= value <= 1:
            self.fail("an agreement outside 0..1:", "a share like 0.97 or 97%")
        self.i += 1
        if self.peek() != ("word", "over"):
            self.fail(f"after agreement{op}{number}: unexpected",
                      "'over ROWS' (the compared rows it needs, e.g. over 1000)")  # fmt: skip
        self.i += 1
        kind, rows = self.peek()
        if (
            kind != "number"
            or rows.endswith("%")
            or not float(rows).is_integer()
            or float(rows) < 1
        ):
            self.fail("after over: unexpected", "a whole number of rows (e.g. 1000)")
        self.i += 1
        return Agreement(op, value, int(float(rows)))
