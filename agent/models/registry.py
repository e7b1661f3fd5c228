"""The active model of every name, swapped one reference at a time.

A request takes its own reference with ``get`` and runs on it; ``swap`` replaces the
dict entry under a lock. A request in flight during a swap finishes on the old object,
which is released when the last such request lets go of it. No request ever fails
because of a swap.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.models.runtime import LoadedModel
from agent.wire.errors import ModelNotFound, NotReady

# Deployment states a model can be in, as /status and the retained MQTT status show them
# (defined with the status payload, so the fleet side reads the same names).
from agent.wire.payloads import (
    ACTIVE,
    DOWNLOADING,
    FAILED,
    INSTALLING,
    NOT_IN_ROLLOUT,
    PROBATION,
    REJECTED,
    RETRYING,
    ROLLED_BACK,
)

__all__ = [
    "ACTIVE", "DOWNLOADING", "FAILED", "INSTALLING", "NOT_IN_ROLLOUT", "PROBATION",
    "REJECTED", "RETRYING", "ROLLED_BACK", "ModelState", "Registry",
]  # fmt: skip


@dataclass
class ModelState:
    """What /status says about one model beyond the loaded version."""

    state: str = ACTIVE
    reason: str = ""
    since: float = field(default_factory=time.time)


class Registry:
    """Name -> active LoadedModel, plus a per-model deployment state."""

    def __init__(self, default: str | None = None) -> None:
        self.default = default or None
        self._models: dict[str, LoadedModel] = {}
        self._states: dict[str, ModelState] = {}
        self._order: tuple[str, ...] = ()  # first installed first (the store's order)
        # Candidates installed with --shadow: loaded beside the active one, never served.
        self._shadows: dict[str, LoadedModel] = {}
        # Candidates installed with --canary-traffic P: serve P% of the requests.
        self._canaries: dict[str, tuple[LoadedModel, float]] = {}
        self._lock = threading.Lock()

    def set_order(self, names: list[str]) -> None:
        """The names in the order they were installed: the first loaded one answers a
        request that names no model, whatever was installed after it."""
        self._order = tuple(names)

    def default_name(self) -> str | None:
        """The model a request without a name goes to: ``models.default``, else the first
        installed of the loaded ones (None while nothing is loaded)."""
        if self.default is not None:
            return self.default
        models = self._models
        for name in self._order:
            if name in models:
                return name
        # Not in the order (a registry nobody gave one): the first swapped in.
        return next(iter(models), None)

    def get(self, name: str | None = None, version: str | None = None) -> LoadedModel:
        """The active model ``name`` (None: ``models.default``, else the first installed)."""
        models = self._models  # one read of the reference: no lock on the hot path
        if not models:
            raise NotReady(self._not_ready())
        if name is None:
            if self.default is None and len(models) == 1:
                return next(iter(models.values()))
            name = self.default_name()
            assert name is not None
        model = models.get(name)
        if model is None:
            raise ModelNotFound(name, why=self.why(name))
        if version is not None and version != model.version:
            canary = self._canaries.get(name)
            if canary is not None and canary[0].version == version:
                return canary[0]  # a caller may address the canary arm by its version
            raise ModelNotFound(name, version)
        return model

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` the active one of its name; return the one it replaced."""
        with self._lock:
            # Copy-on-write: readers see the old dict or the new one, never a torn one.
            models = dict(self._models)
            old = models.get(model.name)
            models[model.name] = model
            self._models = models
            self._states[model.name] = ModelState(ACTIVE)
            shadow = self._shadows.get(model.name)
            if shadow is not None and shadow.version == model.version:
                self._shadows = {k: v for k, v in self._shadows.items() if k != model.name}
            # Any activation ends a split: a promotion makes the canary the only version,
            # a rollback (or another version) drops it.
            self._canaries = {k: v for k, v in self._canaries.items() if k != model.name}
        return old

    def set_canary(self, model: LoadedModel, percent: float) -> None:
        """Let ``model`` serve ``percent`` of its name's requests beside the active one."""
        with self._lock:
            self._canaries = {**self._canaries, model.name: (model, percent)}

    def clear_canary(self, name: str) -> LoadedModel | None:
        with self._lock:
            old = self._canaries.get(name)
            self._canaries = {k: v for k, v in self._canaries.items() if k != name}
        return None if old is None else old[0]

    def canary(self, name: str) -> tuple[LoadedModel, float] | None:
        """The canary of ``name`` and its percent, or None; one dict read, for the hot path."""
        return self._canaries.get(name)

    def set_shadow(self, model: LoadedModel) -> None:
        """Hold ``model`` as the shadow candidate of its name (replacing any other)."""
        with self._lock:
            self._shadows = {**self._shadows, model.name: model}

    def clear_shadow(self, name: str) -> LoadedModel | None:
        with self._lock:
            old = self._shadows.get(name)
            self._shadows = {k: v for k, v in self._shadows.items() if k != name}
        return old

    def shadow(self, name: str) -> LoadedModel | None:
        """The shadow candidate of ``name`` or None; one dict read, for the hot path."""
        return self._shadows.get(name)

    def loaded(self, name: str) -> LoadedModel | None:
        """The active model of ``name`` or None; never raises."""
        return self._models.get(name)

    def names(self) -> list[str]:
        return sorted(self._models)

    def models(self) -> list[LoadedModel]:
        return [self._models[n] for n in sorted(self._models)]

    def why(self, name: str) -> str | None:
        """What the deployment state says of a model that is not loaded."""
        st = self._states.get(name)
        if st is None:
            return None
        return st.reason or st.state

    def _not_ready(self) -> str:
        """Why nothing serves yet, per model the device knows of: an operator reading the
        503 learns it is outside a rollout or still downloading, not merely "not yet"."""
        why = [f"{name}: {self.why(name)}" for name in sorted(self._states)]
        if not why:
            return "no model is loaded yet (none is installed: `edge-agent install PACKAGE`)"
        return f"no model is loaded yet ({'; '.join(why)})"

    # --- deployment state ------------------------------------------------------------

    def set_state(self, name: str, state: str, reason: str = "") -> None:
        with self._lock:
            self._states[name] = ModelState(state, reason)

    def state(self, name: str) -> ModelState:
        """The deployment state of ``name`` (``failed`` when nothing of it is loaded)."""
        state = self._states.get(name)
        if state is not None:
            return state
        return ModelState(ACTIVE if name in self._models else FAILED)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per model: version, state and the reason for it (for /status)."""
        out: dict[str, dict[str, Any]] = {}
        models, states, shadows = self._models, dict(self._states), self._shadows
        canaries = self._canaries
        for name in sorted(set(models) | set(states)):
            model = models.get(name)
            st = states.get(name) or ModelState()
            out[name] = {
                "version": model.version if model else None,
                "serial": model.manifest.serial if model else None,
                "state": st.state,
                "reason": st.reason or None,
                "since": st.since,
            }
            if name in shadows:
                out[name]["shadow"] = shadows[name].version
            if name in canaries:
                out[name]["canary"] = canaries[name][0].version
                out[name]["canary_traffic"] = canaries[name][1]
        return out
