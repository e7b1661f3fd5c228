"""What a device knows of its desired state, for /status: desired against actual.

Per model: each desired manifest the broker retains for this device (its own and its
fleet's: version and serial, or why it cannot be read), which of them applies, and what
the delivery worker decided about it. Filled by the worker as it weighs a model, so a
reader sees what the worker has actually considered, not merely what has arrived.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from typing import Any

from agent.updates import plan
from agent.wire.errors import EdgeError
from agent.wire.manifest import parse_manifest


class DesiredView:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, Any]] = {}
        self._summaries: dict[str, dict[str, Any]] = {}  # payload digest -> summary

    def weigh(self, model: str, by_source: Mapping[str, bytes]) -> None:
        """The worker looks at ``model``'s desired payloads now."""
        sources = {src: self._summary(payload) for src, payload in by_source.items()}
        applies = plan.effective(by_source)
        with self._lock:
            view = self._models.setdefault(model, {})
            view["sources"] = sources
            view["applies"] = None if applies is None else applies[1]

    def decided(self, model: str, decision: str, reason: str = "") -> None:
        with self._lock:
            view = self._models.setdefault(model, {})
            view["decision"] = decision
            view["reason"] = reason or None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                m: {**v, "sources": dict(v.get("sources", {}))} for m, v in self._models.items()
            }

    def _summary(self, payload: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(payload).hexdigest()
        cached = self._summaries.get(digest)
        if cached is not None:
            return cached
        try:
            m = parse_manifest(payload)
            summary: dict[str, Any] = {"version": m.version, "serial": m.serial}
        except EdgeError as e:
            summary = {"error": str(e)}
        if len(self._summaries) > 256:  # a handful of models; bound it all the same
            self._summaries.clear()
        self._summaries[digest] = summary
        return summary
