"""Shared fixtures live in tests/fixtures/, one module per concern."""

from __future__ import annotations

import importlib.util

# Fixture modules are loaded as plugins so each concern keeps its own file.
pytest_plugins = [
    name
    for name in (
        "tests.fixtures.models",
        "tests.fixtures.quality",
        "tests.fixtures.broker",
        "tests.fixtures.agent",
        "tests.fixtures.disk",
        "tests.fixtures.postgres",
        "tests.fixtures.nginx",
        "tests.fixtures.nats",
    )
    if importlib.util.find_spec(name) is not None
]
