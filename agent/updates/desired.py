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
        """The worker looks at ``model``'s desired payloads now.

        A decision is about one payload: when another one applies now, the old decision
        is dropped until the worker has made one about the new payload.
        """
        sources = {src: self._summary(payload) for src, payload in by_source.items()}
        applies = plan.effective(by_source)
        digest = None if applies is None else _digest(applies[1].encode() + b"\0" + applies[0])
        with self._lock:
            view = self._models.setdefault(model, {})
            view["sources"] = sources
            view["applies"] = None if applies is None else applies[1]
            if view.get("_digest") != digest:
                view["_digest"] = digest
                view.pop("decision", None)
                view.pop("reason", None)

    def decided(self, model: str, decision: str, reason: str = "") -> None:
        with self._lock:
            view = self._models.setdefault(model, {})
            view["decision"] = decision or None
            view["reason"] = reason or None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                m: {
                    **{k: v for k, v in view.items() if not k.startswith("_")},
                    "sources": dict(view.get("sources", {})),
                }
                for m, view in self._models.items()
            }

    def applying(self, model: str) -> dict[str, Any] | None:
        """The model's ``desired`` in the status: what the applicable desired manifest
        asks and what the device decided about it; None when nothing is desired."""
        with self._lock:
            view = self._models.get(model)
            if view is None or view.get("applies") is None:
                return None
            source = view["applies"]
            summary = view.get("sources", {}).get(source, {})
            return {
                "version": summary.get("version"),
                "serial": summary.get("serial"),
                "source": source,
                "decision": view.get("decision"),
                "reason": view.get("reason") or summary.get("error"),
            }

    def _summary(self, payload: bytes) -> dict[str, Any]:
        digest = _digest(payload)
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


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
