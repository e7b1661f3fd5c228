"""Installed model versions on disk and the atomic pointer to the active one.

Layout under ``root`` (``<state_dir>/models``)::

    <name>/<version>/model.onnx, manifest.json   one folder per installed version
    <name>/active.json                           {version, previous, serial, activated_at}
    .order.json                                  {"order": [name, ...]}: first installed first
    .lock                                        flock: one writer across processes

A version folder is written under a temporary name, fsynced and renamed into place, so
a folder with a version's name is always complete. ``active.json`` is switched with
``atomic_write`` (write, fsync, rename, fsync the folder): a kill -9 at any moment leaves
the old pointer or the new one, and both name a complete folder. ``serial`` in the
pointer is the last serial accepted for the name; it never goes down, not even on a
local rollback, so an old signed manifest cannot be replayed.

``.order.json`` keeps the names in the order they were first installed: a request
that names no model goes to the first installed one (unless ``models.default`` says
otherwise), and a second model installed later, or a restart, must not change that.

``edge-agent install`` writes the store from its own process while an agent may be
running; the ``.lock`` file serialises writers and the agent notices a changed pointer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.disk import atomic_write, copy_fsync, fsync_dir, sha256_file
from agent.wire.errors import EdgeError, ManifestInvalid, PackageError
from agent.wire.manifest import MANIFEST_FILE, Manifest
from agent.wire.names import VERSION_RE, is_name, name_problem, parse_version
from agent.wire.package import read_manifest, write_manifest
from agent.wire.times import rfc3339

log = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
SHADOW_FILE = "shadow.json"  # the candidate installed with --shadow, compared beside
ORDER_FILE = ".order.json"  # a dot: never a model's name
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


@dataclass(frozen=True)
class ActivePointer:
    """What ``<name>/active.json`` holds."""

    version: str
    previous: str | None
    serial: int
    activated_at: str
    rolled_back: str | None = None  # the reason, when this activation was a rollback


class ModelStore:
    """Versions of every model on disk, which one is active, and the last serial."""

    def __init__(self, root: Path, keep_versions: int = 3) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_leftovers()
        except OSError as e:
            raise EdgeError(
                f"state_dir: the model store {self.root} cannot be used ({e.strerror or e}); "
                "run as the agent's user or root"
            ) from None

    # --- locking -------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's writer lock (across processes, via flock)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _clean_leftovers(self) -> None:
        """Remove temp folders of installs that were interrupted (a crash mid-copy)."""
        with self.locked():
            for temp in self.root.glob(f".{ORDER_FILE}.*"):
                temp.unlink(missing_ok=True)  # atomic_write's temp file
            for name_dir in self._name_dirs():
                for child in name_dir.iterdir():
                    if child.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                        log.info("store: removing leftover of an interrupted install: %s", child)
                        shutil.rmtree(child, ignore_errors=True)
                    elif child.name.startswith(f".{ACTIVE_FILE}."):
                        child.unlink(missing_ok=True)  # atomic_write's temp file
                    elif child.is_dir():
                        for temp in child.glob(f".{MANIFEST_FILE}.*"):
                            temp.unlink(missing_ok=True)

    # --- reading -------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        """``root/name``, for a plain name only: no path the store builds leaves its root.

        The wire validator refuses such names already; this is the store's own guard,
        whoever calls it.
        """
        problem = name_problem("name", name)
        if problem is not None:
            raise ManifestInvalid(problem)
        path = self.root / name
        if path.resolve().parent != self.root.resolve():
            raise ManifestInvalid(f"name: {name!r} leads outside the model store {self.root}")
        return path

    def _name_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and is_name(p.name))

    def names(self) -> list[str]:
        """Every model with at least one installed version, first installed first.

        Names the order file does not know (a store from before it) follow, by name.
        """
        installed = [p.name for p in self._name_dirs() if self.versions(p.name)]
        known = [n for n in self._order() if n in installed]
        return known + [n for n in installed if n not in known]

    def _order(self) -> list[str]:
        try:
            data = json.loads((self.root / ORDER_FILE).read_text())
        except (OSError, ValueError):
            return []
        order = data.get("order") if isinstance(data, dict) else None
        return [n for n in order if is_name(n)] if isinstance(order, list) else []

    def _record_order(self, name: str) -> None:
        """Append a newly installed name to the order (call with ``locked()`` held)."""
        order = self.names()  # this name has no version yet: it is not in it
        if name in order:
            return
        atomic_write(self.root / ORDER_FILE, json.dumps({"order": [*order, name]}).encode())

    def versions(self, name: str) -> list[str]:
        """Installed versions of ``name``, oldest first (compared numerically)."""
        d = self._dir(name)
        if not d.is_dir():
            return []
        found = [
            p.name
            for p in d.iterdir()
            if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=parse_version)

    def version_dir(self, name: str, version: str) -> Path:
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ManifestInvalid(f"version: {version!r} is not dotted numbers like 1.2.0")
        return self._dir(name) / version

    def manifest(self, name: str, version: str) -> Manifest:
        return read_manifest(self.version_dir(name, version))

    def active(self, name: str) -> ActivePointer | None:
        """The active pointer of ``name``; None when nothing was ever activated."""
        path = self._dir(name) / ACTIVE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            # atomic_write never leaves a torn file; this is damage from outside.
            raise ManifestInvalid(f"{path}: unreadable active pointer ({e})") from None
        try:
            return ActivePointer(
                version=str(data["version"]),
                previous=None if data.get("previous") is None else str(data["previous"]),
                serial=int(data.get("serial", 0)),
                activated_at=str(data.get("activated_at", "")),
                rolled_back=None if data.get("rolled_back") is None else str(data["rolled_back"]),
            )
        except (KeyError, TypeError, ValueError):
            raise ManifestInvalid(f"{path}: expected {{version, previous, serial}}") from None

    def shadow(self, name: str) -> str | None:
        """The version installed beside the active one with ``--shadow``, or None."""
        path = self._dir(name) / SHADOW_FILE
        try:
            data = json.loads(path.read_text())
            version = data["version"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("store: %s: unreadable shadow pointer (%s); no shadow", path, e)
            return None
        if (
            not isinstance(version, str)
            or not (self.version_dir(name, version) / MANIFEST_FILE).is_file()
        ):
            return None  # pruned or never completed: nothing to compare
        return version

    def set_shadow(self, name: str, version: str | None) -> None:
        """Point ``name``'s shadow at ``version`` (None: no shadow). Call with ``locked()``."""
        path = self._dir(name) / SHADOW_FILE
        if version is None:
            path.unlink(missing_ok=True)
            return
        atomic_write(path, json.dumps({"version": version, "since": rfc3339()}).encode() + b"\n")

    def last_serial(self, name: str) -> int:
        """The last manifest serial accepted for ``name`` (-1 when none was)."""
        pointer = self.active(name)
        return -1 if pointer is None else pointer.serial

    # --- writing -------------------------------------------------------------------

    def add_version(self, package_dir: Path, manifest: Manifest) -> Path:
        """Copy a verified package into ``<name>/<version>/``; return that folder.

        The copy goes to a temp folder that is fsynced and renamed into place. A version
        already installed with the same artifact only gets the new manifest (a rollback
        manifest re-signs an old artifact with a new serial). Call with ``locked()`` held.
        """
        name_dir = self._dir(manifest.name)
        if not self.versions(manifest.name):
            self._record_order(manifest.name)
        name_dir.mkdir(parents=True, exist_ok=True)
        final = name_dir / manifest.version
        if final.is_dir() and (final / MANIFEST_FILE).is_file():
            artifact = final / manifest.artifact.file
            if artifact.is_file() and sha256_file(artifact) == manifest.artifact.sha256:
                write_manifest(final, manifest.to_dict())
                return final
            pointer = self.active(manifest.name)
            if pointer is not None and manifest.version in {pointer.version, pointer.previous}:
                raise PackageError(
                    f"version: {manifest.name} {manifest.version} is already installed with "
                    "another artifact and is active or the rollback target; publish a new version"
                )
            self._remove_version_dir(final)

        tmp = name_dir / f"{_TMP_PREFIX}{manifest.version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for file in (manifest.artifact.file, MANIFEST_FILE):
                copy_fsync(package_dir / file, tmp / file)
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(name_dir)
        return final

    def activate(
        self,
        name: str,
        version: str,
        *,
        serial: int | None = None,
        rolled_back: str | None = None,
    ) -> ActivePointer:
        """Point ``name`` at ``version`` atomically; the old active becomes ``previous``.

        ``serial`` is the accepted manifest's serial; the stored serial only grows.
        Call with ``locked()`` held.
        """
        if not (self.version_dir(name, version) / MANIFEST_FILE).is_file():
            raise PackageError(f"version: {name} {version} is not installed")
        old = self.active(name)
        if old is None:
            previous = None
        elif old.version == version:  # re-activation (e.g. a new serial): keep the fallback
            previous = old.previous
        else:
            previous = old.version
        last = -1 if old is None else old.serial
        pointer = ActivePointer(
            version=version,
            previous=previous,
            serial=max(last, serial if serial is not None else -1),
            activated_at=rfc3339(),
            rolled_back=rolled_back,
        )
        atomic_write(self._dir(name) / ACTIVE_FILE, json.dumps(asdict(pointer)).encode() + b"\n")
        return pointer

    def prune(self, name: str) -> list[str]:
        """Remove the oldest versions beyond ``keep_versions``; never active or previous."""
        pointer = self.active(name)
        protected = set() if pointer is None else {pointer.version, pointer.previous}
        protected.add(self.shadow(name))
        versions = self.versions(name)
        removable = [v for v in versions if v not in protected]
        excess = len(versions) - self.keep_versions
        removed = removable[: max(0, excess)]
        for version in removed:
            self._remove_version_dir(self.version_dir(name, version))
        return removed

    def _remove_version_dir(self, path: Path) -> None:
        # Rename first so that a crash mid-delete leaves a leftover, not half a version.
        trash = path.parent / f"{_OLD_PREFIX}{path.name}-{time.monotonic_ns()}"
        os.rename(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)
