"""``edge-fleet``: the operator's commands over the central broker.

Each command lives in its own module with ``add_parser(subparsers) -> parser`` that
sets ``func`` (``run(args) -> int``); this file only assembles them and turns errors
into exit codes: 0 success, 1 a failure explained in one line on stderr (a traceback
only with ``--verbose``), 2 bad usage. ``fleet/publish.py`` (publish, rollout,
rollback) is registered when it is present, with the same ``add_parser`` hook (it may
return one parser or a list of them).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from agent.wire import __version__
from agent.wire.errors import run_command

PROG = "edge-fleet"
# Modules holding subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "fleet.publish",
    "fleet.rollouts",
    "fleet.unpublish",
    "fleet.status",
    "fleet.shadow_report",
    "fleet.inventory",
    "fleet.events",
    "fleet.forget",
    "fleet.exporter",
    "fleet.collect",
    "fleet.results",
    "fleet.enroll",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish models to a fleet of edge-agent devices and watch it, over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logs, tracebacks",
    )
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        added = module.add_parser(sub)
        for p in added if isinstance(added, list | tuple) else [added]:
            # SUPPRESS: a subcommand's default must not undo `edge-fleet -v status`.
            p.add_argument(
                "-v",
                "--verbose",
                action="store_true",
                default=argparse.SUPPRESS,
                help="debug logs, tracebacks",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("paho").setLevel(logging.WARNING)
    return run_command(PROG, lambda: args.func(args), verbose=verbose)
