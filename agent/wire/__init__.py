"""The wire format: the only part of ``agent/`` that ``converter/`` and ``fleet/`` import.

errors, names, times, datatypes, manifest, signing, package, topics, payloads and
parity: what travels between a publisher, the broker, a device and the fleet side is
defined once, here, and checked by the same code on every side.
"""

from __future__ import annotations

from agent import __version__

__all__ = ["__version__"]
