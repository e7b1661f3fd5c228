"""What a delivery command says: result lines, notes and warnings, or one JSON document.

``publish``, ``rollout``, ``rollback``, ``gc`` and ``unpublish`` report through one
``Report``: result lines go to stdout (so a script can read them), notes and warnings to
stderr. With ``--json`` stdout holds only the JSON document printed at the end
(``fleet.term.print_json``), and the result lines move to stderr, so
``edge-fleet publish ... --json | jq`` always parses.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

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
