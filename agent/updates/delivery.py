"""Model delivery: retained desired state -> rollout decision -> chunk download -> installer.

MQTT callbacks only record the latest desired payload per model (or hand a chunk to a
queue); one worker thread does everything else, so paho's thread and the HTTP server
never wait for a download, a hash or a model load. For each model the worker takes the
device's own desired manifest if there is one, else the fleet's, and:

1. parses it (``rejected`` if it is not a manifest) and checks its signature;
2. asks the plan (agent/updates/plan.py): outside the rollout (``not_in_rollout``),
   already served or accepted, a replayed serial (``rejected``), or install;
3. downloads the missing chunks (``downloading``), resumable across reconnects and
   restarts (agent/updates/download.py), after checking free disk;
4. checks size and sha256 (``verified``), then ``Installer.install`` (serial, schema,
   load, parity, atomic activation): ``activated``, else ``rejected`` with the reason;
5. puts a newer version on probation (agent/updates/probation.py); an older one is the
   operator's rollback and is not on trial.

A refusal of the manifest itself is final for that payload (remembered across restarts);
a missing chunk, a corrupt artifact or a full disk is retried after ``delivery_retry_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.disk import atomic_write
from agent.loops import Loop
from agent.models.registry import ACTIVE, FAILED, NOT_IN_ROLLOUT, PROBATION, UPDATING
from agent.updates import plan
from agent.updates.desired import DesiredView
from agent.updates.download import PartialDownload, clean_downloads
from agent.updates.plan import DEVICE, FLEET
from agent.updates.probation import Probation
from agent.wire import payloads
from agent.wire.errors import EdgeError, ManifestInvalid, PackageError, StorageFull
from agent.wire.manifest import Manifest, parse_manifest
from agent.wire.names import parse_version
from agent.wire.signing import verify_signature
from agent.wire.topics import Topics

if TYPE_CHECKING:
    from agent.config import Config
    from agent.link import Link, Message
    from agent.metrics import Metrics
    from agent.models.store import ModelStore
    from agent.updates.events import Events
    from agent.updates.installer import Change, Installer

log = logging.getLogger(__name__)

# Tests set this to pause the worker at one step ("chunk:N", "verify", "verified",
# "install", "activated") and
# SIGKILL the agent there: deterministic, where sleeping and hoping is not.
PAUSE_ENV = "EDGE_DELIVERY_PAUSE_AT"
PAUSED_FILE = "delivery-paused"
STATE_FILE = "delivery.json"


class Retry(EdgeError):
    """A delivery that failed for now (missing chunk, corrupt artifact, full disk)."""


class _Superseded(Exception):
    """A newer desired manifest arrived during the download."""


class Delivery:
    """Converges this device's models to the desired state retained on the broker."""

    def __init__(
        self,
        cfg: Config,
        mqtt: Link,
        installer: Installer,
        store: ModelStore,
        events: Events,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.mqtt = mqtt
        self.events = events
        self.installer = installer
        self.store = store
        self.device, self.fleet = cfg.device.id, cfg.device.fleet
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.root = cfg.state_path / "downloads"
        self.state_path = cfg.state_path / STATE_FILE
        self._lock = threading.Lock()
        self._desired: dict[str, dict[str, bytes]] = {}  # model -> source -> payload
        self._handled: dict[str, str] = {}  # model -> fingerprint of the payload settled
        self._retry_at: dict[str, float] = {}
        self._chunks: queue.Queue[tuple[str, int, bytes]] = queue.Queue()
        # A step can download and load a large model; it beats on every chunk.
        self.loop = Loop(
            "delivery", self._step, stall_s=max(300.0, 2 * cfg.models.delivery_chunk_timeout_s)
        )
        self._pause_at = os.environ.get(PAUSE_ENV, "")
        self.probation: Probation | None = None
        if metrics is not None and cfg.models.probation_s > 0:
            self.probation = Probation(
                cfg.models, metrics.inference, self._probation_failed, self._probation_passed
            )
        self.desired = DesiredView()
        self._outcome, self._outcome_reason = "", ""
        self._rejected = self._load_state()
        self._handled.update({m: r["fingerprint"] for m, r in self._rejected.items()})

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.loop.start()
        self.mqtt.subscribe(self.topics.fleet_desired_all(self.fleet), 1, self._on_desired)
        self.mqtt.subscribe(self.topics.device_desired_all(self.device), 1, self._on_desired)

    def stop(self) -> None:
        self.loop.stop()

    def alive(self) -> bool:
        return self.loop.alive()

    # --- MQTT side: record and wake, nothing more ----------------------------------------

    def _on_desired(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        model = parts[-2]
        source = DEVICE if f"/devices/{self.device}/models/" in msg.topic else FLEET
        with self._lock:
            by_source = self._desired.setdefault(model, {})
            if msg.payload:
                by_source[source] = msg.payload
            else:  # a cleared retained message: this source no longer wants anything
                by_source.pop(source, None)
            self._retry_at.pop(model, None)
        self.loop.wake()

    def _on_chunk(self, msg: Message) -> None:
        parts = msg.topic.rsplit("/", 2)
        if len(parts) == 3 and parts[2].isdigit():
            self._chunks.put((parts[1], int(parts[2]), msg.payload))

    def _effective(self, model: str) -> tuple[bytes, str] | None:
        with self._lock:
            return plan.effective(dict(self._desired.get(model, {})))

    # --- the worker --------------------------------------------------------------------

    def _step(self) -> float:
        with self._lock:
            models = sorted(self._desired)
        for model in models:
            if self.loop.stopping:
                break
            try:
                self._reconcile(model)
            except Exception:
                log.exception("delivery: %s failed unexpectedly", model)
                self._retry_at[model] = time.monotonic() + self.cfg.models.delivery_retry_s
        return 1.0

    def _reconcile(self, model: str) -> None:
        with self._lock:
            by_source = dict(self._desired.get(model, {}))
        self.desired.weigh(model, by_source)
        current = plan.effective(by_source)
        if current is None:
            return
        payload, source = current
        fingerprint = hashlib.sha256(source.encode() + b"\0" + payload).hexdigest()
        if self._handled.get(model) == fingerprint:
            return
        if time.monotonic() < self._retry_at.get(model, 0.0):
            return
        manifest: Manifest | None = None
        try:
            manifest = parse_manifest(payload)
            if manifest.name != model:
                raise ManifestInvalid(
                    f"name: {manifest.name!r}, but it was published as the desired state of "
                    f"model {model!r}"
                )
            self._deliver(model, manifest, source)
        except _Superseded:
            return  # the loop picks the newer manifest up at once
        except Retry as e:
            self._retry_at[model] = time.monotonic() + self.cfg.models.delivery_retry_s
            self._refused(model, manifest, str(e), final=False)
            return
        except PackageError as e:
            self._refused(model, manifest, str(e), final=True)
            self._remember_rejected(model, fingerprint, str(e))
        else:
            assert manifest is not None
            self.desired.decided(model, self._outcome, self._outcome_reason)
        self._handled[model] = fingerprint

    def _deliver(self, model: str, manifest: Manifest, source: str) -> None:
        verify_signature(manifest, self.installer.trusted, require=self.installer.require_signature)
        pointer = self.store.active(model)
        decision = plan.decide(
            manifest,
            source,
            self.device,
            active=None if pointer is None else (pointer.version, pointer.serial),
            last_serial=self.store.last_serial(model),
        )
        self._outcome, self._outcome_reason = decision.action, decision.reason
        if decision.action == plan.OUTSIDE:
            self._outside(model, manifest, decision.reason)
            return
        if decision.action == plan.CURRENT:
            # A crash after the activation may have left its download folder behind.
            shutil.rmtree(self.root / manifest.artifact.sha256, ignore_errors=True)
            return
        if decision.action == plan.ACCEPTED:
            if pointer is not None and pointer.rolled_back:
                # Rolled back since (by probation, a command): not retried until a new serial.
                self._outcome_reason = (
                    f"{decision.reason}; {pointer.version} serves since a rollback "
                    f"({pointer.rolled_back}); a new serial tries {manifest.version} again"
                )
            return
        package = self._local_package(manifest) or self._download(manifest)
        self._event(payloads.VERIFIED, manifest)
        self._pause("install")
        loaded = self.installer.registry.loaded(model)
        previous = loaded.version if loaded is not None else None
        self.installer.install(package, source=f"mqtt ({source} desired state)")
        self._pause("activated")
        self._after_install(model, manifest.version, previous)
        self._event(payloads.ACTIVATED, manifest, previous=previous)
        self._outcome, self._outcome_reason = payloads.ACTIVATED, ""
        self._rejected.pop(model, None)
        clean_downloads(self.root, keep=set())

    def _after_install(self, model: str, version: str, previous: str | None) -> None:
        """A newer version goes on probation against the one it replaced; an older one
        is the operator's rollback (``edge-fleet rollback``: a desired state naming an
        older version), which is what they asked for and is never on trial. Judging
        it against the version rolled back from would undo the rollback."""
        if self.probation is None or previous in (None, version):
            return
        assert previous is not None
        if parse_version(version) < parse_version(previous):
            self.probation.end(model)
            self._set_state(model, ACTIVE, f"rolled back from {previous} by the desired state")
            return
        self.probation.begin(model, version, previous)
        self._set_state(model, PROBATION, f"on probation for {self.cfg.models.probation_s:g} s")

    def on_change(self, change: Change) -> None:
        """Installer listener: a version activated by anyone else (a device command,
        ``edge-agent rollback``/``install`` beside the agent) ends the trial of the one it
        replaced, so probation never judges, nor rolls back, what it no longer serves."""
        if self.probation is None:
            return
        trial = self.probation.on_trial(change.name)
        if trial is not None and trial.version != change.manifest.version:
            log.info("probation: %s %s ends: %s %s is active now (%s)", change.name,
                     trial.version, change.manifest.version, change.event,
                     change.reason or "activated")  # fmt: skip
            self.probation.end(change.name)

    def _outside(self, model: str, manifest: Manifest, reason: str) -> None:
        """Not in this rollout: say so in an event and in /status (and the retained
        status), so nobody has to guess why the device stays where it is."""
        log.info("delivery: %s %s: %s", model, manifest.version, reason)
        self._event(payloads.NOT_IN_ROLLOUT, manifest, reason=reason)
        loaded = self.installer.registry.loaded(model)
        self._set_state(model, ACTIVE if loaded else NOT_IN_ROLLOUT,
                        f"{manifest.version}: {reason}")  # fmt: skip

    # --- artifact --------------------------------------------------------------------

    def _local_package(self, manifest: Manifest) -> Path | None:
        """A version already in the store with this artifact (a rollback, a re-signed
        rollout) is installed from there: nothing to download."""
        if manifest.version not in self.store.versions(manifest.name):
            return None
        try:
            stored = self.store.manifest(manifest.name, manifest.version)
        except EdgeError:
            return None
        if stored.artifact.sha256 != manifest.artifact.sha256:
            return None
        src = self.store.version_dir(manifest.name, manifest.version) / manifest.artifact.file
        dl = PartialDownload(self.root, manifest.artifact)
        pkg = dl.dir / "package"
        pkg.mkdir(exist_ok=True)
        target = pkg / manifest.artifact.file
        target.unlink(missing_ok=True)
        try:
            os.link(src, target)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(src, target)
        atomic_write(pkg / "manifest.json", json.dumps(manifest.to_dict()).encode())
        return pkg

    def _download(self, manifest: Manifest) -> Path:
        art = manifest.artifact
        dl = PartialDownload(self.root, art)
        if not dl.complete:
            try:
                dl.check_disk()
            except StorageFull as e:
                raise Retry(str(e)) from None
            self._event(
                payloads.DOWNLOADING, manifest, chunks=art.chunks, have=len(dl.have), size=art.size
            )
            self._set_state(manifest.name, UPDATING, f"downloading {manifest.version}")
            self._fetch(manifest, dl)
        self._pause("verify")
        try:
            dl.verify()
        except PackageError as e:
            raise Retry(f"downloaded artifact: {e}") from None
        self._pause("verified")
        return dl.package(manifest.to_dict())

    def _fetch(self, manifest: Manifest, dl: PartialDownload) -> None:
        art, model = manifest.artifact, manifest.name
        while not self._chunks.empty():  # leftovers of an earlier subscription
            self._chunks.get_nowait()
        topic = self.topics.artifact_all(art.sha256)
        self.mqtt.subscribe(topic, 1, self._on_chunk)
        timeout = self.cfg.models.delivery_chunk_timeout_s
        last_progress = time.monotonic()
        want = self._effective(model)
        try:
            while not dl.complete:
                self.loop.beat()
                if self.loop.stopping:
                    raise _Superseded()
                if self._effective(model) != want:
                    raise _Superseded()
                try:
                    sha, index, data = self._chunks.get(timeout=0.5)
                except queue.Empty:
                    if time.monotonic() - last_progress > timeout:
                        first, count = dl.missing(limit=1)[0], dl.missing_count
                        more = f" (and {count - 1} more)" if count > 1 else ""
                        raise Retry(
                            f"missing chunk {first}{more} of artifact {art.sha256}: "
                            f"nothing new for {timeout:g} s; retrying in "
                            f"{self.cfg.models.delivery_retry_s:g} s"
                        ) from None
                    continue
                if sha != art.sha256:
                    continue
                try:
                    new = dl.write(index, data)
                except PackageError as e:
                    raise Retry(f"artifact {art.sha256[:12]}: {e}") from None
                if new:
                    last_progress = time.monotonic()
                    self._pause(f"chunk:{len(dl.have)}")
        finally:
            self.mqtt.unsubscribe(topic)

    # --- outcomes ----------------------------------------------------------------------

    def _refused(self, model: str, manifest: Manifest | None, reason: str, *, final: bool) -> None:
        log.warning("delivery: %s %s refused: %s", model,
                    manifest.version if manifest else "?", reason)  # fmt: skip
        self._event(payloads.REJECTED, manifest, model=model, reason=reason, retry=not final)
        self.desired.decided(model, payloads.REJECTED if final else "retrying", reason)
        loaded = self.installer.registry.loaded(model)
        what = manifest.version if manifest else "the desired manifest"
        self._set_state(
            model, ACTIVE if loaded else FAILED, f"delivery of {what} refused: {reason}"
        )

    def _probation_failed(self, model: str, version: str, reason: str) -> None:
        loaded = self.installer.registry.loaded(model)
        if loaded is None or loaded.version != version:
            # Something else (an operator's rollback) replaced it in the same second.
            log.info("probation: %s %s failed, but %s serves now: nothing to roll back",
                     model, version, loaded.version if loaded else "nothing")  # fmt: skip
            return
        # The installer tells its listeners; the rolled_back event comes from there.
        try:
            self.installer.rollback(model, reason=f"probation of {version}: {reason}")
        except EdgeError as e:
            log.error("probation: rolling %s back failed: %s", model, e)

    def _probation_passed(self, model: str, version: str) -> None:
        loaded = self.installer.registry.loaded(model)
        if loaded is not None and loaded.version == version:
            self._set_state(model, ACTIVE, f"{version} passed probation")

    def _set_state(self, model: str, state: str, reason: str) -> None:
        self.installer.registry.set_state(model, state, reason)
        self.mqtt.publish_status()

    def _event(self, event: str, manifest: Manifest | None, **extra: Any) -> None:
        self.events.publish(event, manifest, **extra)

    def _pause(self, step: str) -> None:
        if self._pause_at and self._pause_at == step:
            atomic_write(self.cfg.state_path / PAUSED_FILE, step.encode())
            log.warning("delivery: paused at %s (%s)", step, PAUSE_ENV)
            self.loop.pause(None)
            raise _Superseded()

    # --- what survives a restart ----------------------------------------------------

    def _load_state(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return {}
        rejected = data.get("rejected") if isinstance(data, dict) else None
        if not isinstance(rejected, dict):
            return {}
        return {
            m: r
            for m, r in rejected.items()
            if isinstance(r, dict) and isinstance(r.get("fingerprint"), str)
        }

    def _remember_rejected(self, model: str, fingerprint: str, reason: str) -> None:
        self._rejected[model] = {"fingerprint": fingerprint, "reason": reason}
        try:
            atomic_write(self.state_path, json.dumps({"rejected": self._rejected}).encode())
        except OSError as e:
            log.warning("delivery: cannot record the refusal in %s: %s", self.state_path, e)
