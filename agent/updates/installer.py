"""Install, activate and roll back model versions: the one path every package takes.

``install`` is what ``edge-agent install`` and MQTT delivery both call: verify (hash,
signature, serial), load, warm up, re-check parity on this device, then copy into the
store, flip the active pointer and swap the registry's reference. Until that last
step nothing outside this function has changed, so on any failure the old model stays
active and keeps serving.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agent.config import Config
from agent.models.registry import ACTIVE, FAILED, INSTALLING, ROLLED_BACK, ModelState, Registry
from agent.models.runtime import LoadedModel, check_parity, load_model
from agent.models.store import ModelStore
from agent.secrets import resolve_secret_path
from agent.updates.plan import REPLAY_FIX
from agent.wire.errors import EdgeError, PackageError, ReplayedSerial, StorageFull
from agent.wire.manifest import Manifest
from agent.wire.package import check_artifact, verify_package
from agent.wire.signing import load_trusted_keys

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# Outcomes counted in edge_model_updates_total.
ACTIVATED = "activated"
REJECTED = "rejected"
UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Change:
    """What listeners hear after the active version of a model changed."""

    name: str
    event: str  # "activated" or "rolled_back"
    manifest: Manifest
    reason: str = ""
    previous: str | None = None  # the version that served before


class Installer:
    """Verify, load, check and activate packages; roll back; load the store at start-up."""

    def __init__(
        self,
        cfg: Config,
        store: ModelStore,
        registry: Registry,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.trusted = load_trusted_keys(resolve_secret_path(p) for p in cfg.models.trusted_keys)
        self.require_signature = bool(self.trusted) and not cfg.models.allow_unsigned
        self.listeners: list[Callable[[Change], None]] = []
        self._lock = threading.RLock()
        self._failed_sync: set[tuple[str, str, str]] = set()
        self._updates = None
        if metrics is not None:
            from prometheus_client import Counter

            self._updates = Counter(
                "edge_model_updates",
                "Model installs and rollbacks, by outcome",
                ["model", "outcome"],
                registry=metrics.registry,
            )

    # --- install -------------------------------------------------------------------

    def install(
        self, package_dir: Path, *, source: str = "local", delivered: bool = False
    ) -> Manifest:
        """Verify and activate the package in ``package_dir``; PackageError on refusal.

        ``delivered``: it came as a desired state (the fix for a refusal differs)."""
        with self._lock:
            name = "?"
            updating: ModelState | None = None
            try:
                manifest = verify_package(
                    package_dir, self.trusted, require_signature=self.require_signature
                )
                name = manifest.name
                if self._already_active(manifest):
                    log.info("install: %s %s (serial %d) is already active", name,
                             manifest.version, manifest.serial)  # fmt: skip
                    self._count(name, UNCHANGED)
                    return manifest
                self._check_serial(manifest, delivered)
                updating = self._mark_updating(name)
                model = self._load_checked(package_dir, manifest)
                with self.store.locked():
                    # Another process may have installed meanwhile.
                    self._check_serial(manifest, delivered)
                    model.path = self._store_write(
                        lambda: self.store.add_version(package_dir, manifest)
                    )
                    self._store_write(
                        lambda: self.store.activate(name, manifest.version, serial=manifest.serial)
                    )
                    if self.store.shadow(name) == manifest.version:  # the candidate promoted
                        self._store_write(lambda: self.store.set_shadow(name, None))
                self.registry.set_order(self.store.names())
                self.registry.swap(model)
                self._prune(name)
            except EdgeError as e:
                self._restore_state(name, updating)  # the old version serves on, as it was
                self._count(name, REJECTED)
                log.warning("install from %s refused: %s", source, e)
                raise
            log.info("install: activated %s %s (serial %d) from %s", name, manifest.version,
                     manifest.serial, source)  # fmt: skip
            self._count(name, ACTIVATED)
            self._notify(Change(name, ACTIVATED, manifest))
            return manifest

    def install_shadow(
        self, package_dir: Path, *, source: str = "local", canary: float | None = None
    ) -> Manifest:
        """Verify, load and parity-check a ``--shadow`` candidate, keep it in the store and
        hold it beside the active version; the active version and pointer stay as they are.
        With ``canary`` (a percent) it serves that share of the requests instead (a
        traffic split; only the desired state remembers it, so a restart splits again)."""
        with self._lock:
            name = "?"
            try:
                manifest = verify_package(
                    package_dir, self.trusted, require_signature=self.require_signature
                )
                name = manifest.name
                model = self._load_checked(package_dir, manifest)
                # In the store, so the promotion (the same artifact published again without
                # --shadow) takes it from there instead of downloading it twice.
                with self.store.locked():
                    model.path = self._store_write(
                        lambda: self.store.add_version(package_dir, manifest)
                    )
                    # Kept over restarts, and seen by a running agent's store watcher.
                    if canary is None:
                        self._store_write(lambda: self.store.set_shadow(name, manifest.version))
                if canary is None:
                    self.registry.set_shadow(model)
                else:
                    self.registry.set_canary(model, canary)
            except EdgeError as e:
                self._count(name, REJECTED)
                log.warning("shadow install from %s refused: %s", source, e)
                raise
            log.info("install: %s %s (serial %d) runs %s beside %s", manifest.name,
                     manifest.version, manifest.serial,
                     "in shadow" if canary is None else f"as a {canary:g}% canary",
                     getattr(self.registry.loaded(manifest.name), "version", "nothing"))  # fmt: skip
            return manifest

    def _mark_updating(self, name: str) -> ModelState | None:
        """Show ``installing`` in /status while a new version of a serving model loads."""
        if self.registry.loaded(name) is None:
            return None
        before = self.registry.state(name)
        self.registry.set_state(name, INSTALLING)
        return before

    def _restore_state(self, name: str, before: ModelState | None) -> None:
        if before is not None:
            self.registry.set_state(name, before.state, before.reason)

    def _already_active(self, manifest: Manifest) -> bool:
        pointer = self.store.active(manifest.name)
        return (
            pointer is not None
            and pointer.version == manifest.version
            and pointer.serial == manifest.serial
        )

    def _check_serial(self, manifest: Manifest, delivered: bool) -> None:
        last = self.store.last_serial(manifest.name)
        if manifest.serial > last:
            return
        name, version = manifest.name, manifest.version
        pointer = self.store.active(name)
        if delivered:
            fix = REPLAY_FIX
        elif pointer is not None and pointer.version == version:
            fix = f"{name} {version} is active already: nothing to install"
        else:
            # Serials only grow, also for a local install: re-sign with a higher one, or
            # roll back to the version if the store still holds it (no new serial needed).
            fix = (
                f"re-sign it with a higher serial: `edge-model sign PACKAGE --key KEY "
                f"--serial {last + 1}`"
            )
            if version in self.store.versions(name):
                fix += (
                    f"; or, as {name} {version} is still installed, "
                    f"`edge-agent rollback {name} --to {version}` serves it again"
                )
        raise ReplayedSerial(name, manifest.serial, last, fix=fix)

    def _load_checked(self, version_dir: Path, manifest: Manifest) -> LoadedModel:
        """Load, warm up and re-check parity; the registry is not touched."""
        model = load_model(
            version_dir,
            manifest,
            intra_op_threads=self.cfg.models.intra_op_threads,
            inter_op_threads=self.cfg.models.inter_op_threads,
        )
        check_parity(model)
        return model

    def _store_write(self, write: Callable[[], T]) -> T:
        try:
            return write()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StorageFull(f"state folder {self.store.root}: no space left") from None
            raise PackageError(f"state folder {self.store.root}: {e.strerror or e}") from None

    def _prune(self, name: str) -> None:
        try:
            with self.store.locked():
                removed = self.store.prune(name)
            if removed:
                log.info("store: pruned %s versions %s", name, ", ".join(removed))
        except OSError as e:  # pruning is housekeeping: never fail an install for it
            log.warning("store: pruning %s failed: %s", name, e)

    # --- rollback ------------------------------------------------------------------

    def rollback(self, name: str, *, reason: str, to: str | None = None) -> Manifest:
        """Re-activate the previous version of ``name`` (or ``to``); the current one stays
        installed. Raises PackageError when there is nothing to roll back to."""
        with self._lock:
            pointer = self.store.active(name)
            if pointer is None:
                raise PackageError(f"rollback: model {name!r} is not installed")
            target = to or pointer.previous
            if target is None:
                raise PackageError(
                    f"rollback: {name} has no previous version to roll back to "
                    f"(active: {pointer.version})"
                )
            if target == pointer.version:
                raise PackageError(f"rollback: {name} {target} is already active")
            if target not in self.store.versions(name):
                raise PackageError(
                    f"rollback: {name} {target} is not installed "
                    f"(installed: {', '.join(self.store.versions(name))})"
                )
            try:
                model = self._load_installed(name, target)
                with self.store.locked():
                    self._store_write(lambda: self.store.activate(name, target, rolled_back=reason))
            except EdgeError as e:
                self._count(name, REJECTED)
                log.warning("rollback of %s to %s refused: %s", name, target, e)
                raise
            self.registry.swap(model)
            self.registry.set_state(name, ROLLED_BACK, reason)
            log.warning("rollback: %s %s -> %s (%s)", name, pointer.version, target, reason)
            self._count(name, ROLLED_BACK)
            self._notify(Change(name, ROLLED_BACK, model.manifest, reason, pointer.version))
            return model.manifest

    def _load_installed(self, name: str, version: str) -> LoadedModel:
        """Load a version from the store, checking its file against its manifest first."""
        version_dir = self.store.version_dir(name, version)
        manifest = self.store.manifest(name, version)
        check_artifact(version_dir, manifest)
        return self._load_checked(version_dir, manifest)

    # --- start-up and outside changes ----------------------------------------------

    def load_all(self) -> list[str]:
        """Load the active version of every installed model; returns the names loaded.

        A corrupt active version falls back to the previous one (and the pointer says
        so); a model with neither is left out and marked failed, the others serve.
        """
        loaded = []
        with self._lock:
            names = self.store.names()
            self.registry.set_order(names)  # the first installed answers nameless requests
            for name in names:
                if self._load_active(name):
                    loaded.append(name)
                self._sync_shadow(name)
        return loaded

    def _sync_shadow(self, name: str) -> None:
        """Hold the store's shadow candidate of ``name`` in the registry (or none)."""
        version = self.store.shadow(name)
        held = self.registry.shadow(name)
        if version is None or version == getattr(self.registry.loaded(name), "version", None):
            if held is not None:
                self.registry.clear_shadow(name)
            return
        if held is not None and held.version == version:
            return
        attempt = (name, f"shadow {version}", "")
        if attempt in self._failed_sync:
            return
        try:
            self.registry.set_shadow(self._load_installed(name, version))
            log.info("store: %s %s runs in shadow", name, version)
        except EdgeError as e:
            self._failed_sync.add(attempt)
            log.error("store: shadow %s %s cannot be loaded: %s", name, version, e)

    def _load_active(self, name: str) -> bool:
        try:
            pointer = self.store.active(name)
        except EdgeError as e:
            log.error("store: %s: %s", name, e)
            self.registry.set_state(name, FAILED, str(e))
            return False
        if pointer is None:
            return False
        try:
            self.registry.swap(self._load_installed(name, pointer.version))
            if pointer.rolled_back is not None:  # the state a restart must not forget
                self.registry.set_state(name, ROLLED_BACK, pointer.rolled_back)
            return True
        except EdgeError as e:
            reason = f"active version {pointer.version} cannot be loaded: {e}"
        if pointer.previous is None:
            log.error("store: %s: %s; no previous version to fall back to", name, reason)
            self.registry.set_state(name, FAILED, reason)
            return False
        log.error("store: %s: %s; falling back to %s", name, reason, pointer.previous)
        try:
            model = self._load_installed(name, pointer.previous)
            with self.store.locked():
                self.store.activate(name, pointer.previous, rolled_back=reason)
        except (EdgeError, OSError) as e:
            reason = f"{reason}; previous {pointer.previous} cannot be loaded either: {e}"
            log.error("store: %s: %s", name, reason)
            self.registry.set_state(name, FAILED, reason)
            return False
        self.registry.swap(model)
        self.registry.set_state(name, ROLLED_BACK, reason)
        self._notify(Change(name, ROLLED_BACK, model.manifest, reason, pointer.version))
        return True

    def sync(self) -> list[str]:
        """Load versions another process (``edge-agent install``/``rollback``) activated.

        Returns the names whose active model changed. A version that fails to load is
        tried once per activation; the model already serving stays.
        """
        changed = []
        with self._lock:
            names = self.store.names()
            self.registry.set_order(names)
            for name in names:
                self._sync_shadow(name)
                try:
                    pointer = self.store.active(name)
                except EdgeError:
                    continue
                if pointer is None:
                    continue
                current = self.registry.loaded(name)
                if current is not None and current.version == pointer.version:
                    continue
                attempt = (name, pointer.version, pointer.activated_at)
                if attempt in self._failed_sync:
                    continue
                try:
                    self.registry.set_state(name, INSTALLING, f"loading {pointer.version}")
                    model = self._load_installed(name, pointer.version)
                except EdgeError as e:
                    self._failed_sync.add(attempt)
                    log.error("store: %s %s was activated but cannot be loaded: %s",
                              name, pointer.version, e)  # fmt: skip
                    # The version already serving (if any) stays; /status says why.
                    state = FAILED if current is None else ACTIVE
                    self.registry.set_state(name, state, f"{pointer.version}: {e}")
                    continue
                self.registry.swap(model)
                log.info("store: now serving %s %s (activated by another process)",
                         name, pointer.version)  # fmt: skip
                before = current.version if current is not None else None
                if pointer.rolled_back is not None:  # `edge-agent rollback` beside us
                    self.registry.set_state(name, ROLLED_BACK, pointer.rolled_back)
                    change = Change(name, ROLLED_BACK, model.manifest, pointer.rolled_back, before)
                else:
                    change = Change(name, ACTIVATED, model.manifest, "activated locally", before)
                self._notify(change)
                changed.append(name)
        return changed

    # --- helpers -------------------------------------------------------------------

    def _count(self, name: str, outcome: str) -> None:
        if self._updates is not None:
            self._updates.labels(model=name, outcome=outcome).inc()

    def _notify(self, change: Change) -> None:
        for listener in list(self.listeners):
            try:
                listener(change)
            except Exception:
                log.exception("installer: a listener failed on %s", change)
