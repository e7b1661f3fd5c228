"""What a delivery command says: result lines, notes and warnings, or one JSON document.

``publish``, ``rollout``, ``rollback``, ``gc`` and ``unpublish`` report through one
``Report``: result lines go to stdout (so a script can read them), notes and warnings to
stderr. With ``--json`` stdout holds only the JSON document printed at the end
(``fleet.term.print_json``), and the result lines move to stderr, so
``edge-fleet publish ... --json | jq`` always parses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet.connection import BrokerOptions, broker_options
from fleet.term import print_json


@dataclass
class Report:
    json: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        """A result line: stdout, or stderr when stdout is reserved for JSON."""
        print(line, file=sys.stderr if self.json else sys.stdout, flush=True)

    def note(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def warn(self, line: str) -> None:
        """A warning on stderr, kept for the JSON document too."""
        self.warnings.append(line)
        print(f"warning: {line}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        """Print the JSON document when asked for one (``--json``)."""
        if self.json:
            print_json({"schema": 1, **self.facts, "warnings": self.warnings})


# --- the command-line side ---------------------------------------------------------


def output_arguments(parser: argparse.ArgumentParser, *, strict: bool = False) -> None:
    """``--json`` (and ``--strict`` for the commands that check their targets first)."""
    parser.add_argument("--json", action="store_true",
                        help="one JSON document on stdout (messages stay on stderr)")  # fmt: skip
    if strict:
        parser.add_argument("--strict", action="store_true",
                            help="refuse an unknown fleet/device, unmatched --where or a "
                                 "signing key no targeted device trusts (default: warn)")  # fmt: skip


def run_reported(args: argparse.Namespace, action: Callable[[BrokerOptions, Report], Any]) -> int:
    """Run ``action(options, report)`` and print the JSON document with ``--json``."""
    report = Report(json=bool(getattr(args, "json", False)))
    action(broker_options(args), report)
    report.finish()
    return 0
