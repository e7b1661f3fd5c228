"""Model delivery: retained desired state -> rollout decision -> artifact -> installer.

MQTT callbacks only record the latest desired payload per model (or hand a chunk to a
queue); one worker thread does everything else, so paho's thread and the HTTP server
never wait for a download, a hash or a model load. For each model the worker takes the
device's own desired manifest if there is one, else the fleet's, and:

1. parses it (``rejected`` if it is not a manifest) and checks its signature;
2. asks the plan (agent/updates/plan.py): outside the rollout by tags or bucket
   (``not_in_rollout``), already served or accepted, a replayed serial (``rejected``),
   or install;
3. takes the artifact from the store, else its HTTP(S) origins, else downloads the
   missing chunks (``downloading``; ``artifact_fallback`` when every URL failed and the
   chunks are the fallback; agent/updates/fetch.py), resumable across reconnects and
   restarts;
4. checks size and sha256 (``verified``, naming the ``artifact_source``), then
   ``Installer.install`` (serial, schema, load, parity, atomic activation):
   ``activated``, else ``rejected`` with the reason;
5. puts a newer version on probation (agent/updates/probation.py); an older one is the
   operator's rollback and is not on trial.

Each step sets the model's state and reason (``/status`` and the retained status), and
what was decided about the desired manifest (``DesiredView``). A refusal of the
manifest itself is final for that payload (remembered across restarts); a missing
chunk, a corrupt artifact or a full disk is retried after ``delivery_retry_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Any

from agent.disk import atomic_write
from agent.loops import Loop
from agent.models.registry import (
    ACTIVE,
    DOWNLOADING,
    NOT_IN_ROLLOUT,
    PROBATION,
    REJECTED,
    RETRYING,
)
from agent.updates import plan
from agent.updates.canary import CanaryJudge
from agent.updates.desired import DesiredView
from agent.updates.download import PartialDownload, clean_downloads
from agent.updates.fetch import ArtifactFetcher, Fetched, Retry, Superseded
from agent.updates.plan import DEVICE, FLEET
from agent.updates.probation import Probation
from agent.wire import payloads
from agent.wire.errors import EdgeError, ManifestInvalid, PackageError
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
# States about a desired manifest: a cleared desired state leaves none of them standing.
_DESIRED_STATES = {DOWNLOADING, NOT_IN_ROLLOUT, REJECTED, RETRYING}
__all__ = ["PAUSED_FILE", "PAUSE_ENV", "Delivery", "Retry"]


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
        self.state_path = cfg.state_path / STATE_FILE
        self._lock = threading.Lock()
        self._desired: dict[str, dict[str, bytes]] = {}  # model -> source -> payload
        self._handled: dict[str, str] = {}  # model -> fingerprint of the payload settled
        self._retry_at: dict[str, float] = {}
        # A step can download and load a large model; it beats on every chunk.
        self.loop = Loop(
            "delivery", self._step, stall_s=max(300.0, 2 * cfg.models.delivery_chunk_timeout_s)
        )
        self._pause_at = os.environ.get(PAUSE_ENV, "")
        self.fetcher = ArtifactFetcher(cfg, mqtt, store, self.loop, self._pause)
        self.root = self.fetcher.root
        self.probation: Probation | None = None
        if metrics is not None and cfg.models.probation_s > 0:
            self.probation = Probation(
                cfg.models, metrics.inference, self._probation_failed, self._probation_passed
            )
        self.canary: CanaryJudge | None = None
        if metrics is not None:
            self.canary = CanaryJudge(cfg.models, metrics, installer.registry, self._canary_failed)
        self.desired = DesiredView()
        self._artifacts = None
        if metrics is not None:
            from prometheus_client import Counter

            self._artifacts = Counter(
                "edge_model_artifacts",
                "Artifacts a delivery obtained, by where they came from (origin, "
                "broker_chunks, store)",
                ["model", "source"],
                registry=metrics.registry,
            )
        self._outcome, self._outcome_reason = "", ""
        self._rejected = self._load_state()
        self._handled.update({m: r["fingerprint"] for m, r in self._rejected.items()})
        # Refusals from before a restart: state and decision are said again once weighed.
        self._unannounced = set(self._rejected)

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
            self._nothing_desired(model)
            return
        payload, source = current
        fingerprint = hashlib.sha256(source.encode() + b"\0" + payload).hexdigest()
        if self._handled.get(model) == fingerprint:
            if model in self._unannounced:
                self._unannounced.discard(model)
                record = self._rejected[model]
                self.desired.decided(model, payloads.REJECTED, record["reason"])
                self._set_state(model, REJECTED, _refusal(record.get("version"), record["reason"]))
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
        except Superseded:
            return  # the loop picks the newer manifest up at once
        except Retry as e:
            self._retry_at[model] = time.monotonic() + self.cfg.models.delivery_retry_s
            self._refused(model, manifest, str(e), final=False)
            return
        except PackageError as e:
            self._refused(model, manifest, str(e), final=True)
            self._remember_rejected(model, fingerprint, str(e), manifest)
        else:
            assert manifest is not None
            self.desired.decided(model, self._outcome, self._outcome_reason)
            self.mqtt.publish_status()  # the retained status carries the decision
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
            tags=self.cfg.device.tags,
        )
        self._outcome, self._outcome_reason = decision.action, decision.reason
        if decision.action != plan.CANARY and self.installer.registry.clear_canary(model):
            # A desired state without --canary-traffic ends the split: a promotion (the
            # same version, installed below) or anything else drops the canary.
            log.info("delivery: %s: the traffic split ends (%s)", model, decision.action)
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
        self.desired.decided(model, plan.INSTALL)
        want = self._effective(model)
        fetched = self.fetcher.package(
            manifest,
            starting=lambda dl: self._downloading(manifest, dl),
            wanted=lambda: self._effective(model) == want,
            falling_back=lambda failures: self._falling_back(manifest, failures),
        )
        package = fetched.package
        self._event(payloads.VERIFIED, manifest, artifact_source=fetched.source,
                    url=fetched.url)  # fmt: skip
        if self._artifacts is not None:
            self._artifacts.labels(model, fetched.source).inc()
        if decision.action in (plan.SHADOW, plan.CANARY):
            canary = manifest.canary_traffic if decision.action == plan.CANARY else None
            self.installer.install_shadow(package, source=f"mqtt ({source} desired state)",
                                          canary=canary)  # fmt: skip
            self._outcome, self._outcome_reason = decision.action, decision.reason
            serving = self.installer.registry.loaded(model)
            how = "in shadow" if canary is None else f"as a {canary:g}% canary"
            if serving is not None:  # the download's state ends; the active one serves on
                self._set_state(model, ACTIVE, f"{manifest.version} runs {how} beside "
                                f"{serving.version}")  # fmt: skip
            self._forget_rejected(model)
            clean_downloads(self.root, keep=set())
            return
        self._pause("install")
        loaded = self.installer.registry.loaded(model)
        previous = loaded.version if loaded is not None else None
        self.installer.install(package, source=f"mqtt ({source} desired state)", delivered=True)
        self._pause("activated")
        self._after_install(model, manifest.version, previous)
        self._event(payloads.ACTIVATED, manifest, previous=previous)
        # With origins in the manifest the desired reason says which one delivered.
        reason = _source_text(fetched) if manifest.artifact.urls else ""
        self._outcome, self._outcome_reason = payloads.ACTIVATED, reason
        self._forget_rejected(model)
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
        replaced, so probation never judges, nor rolls back, what it no longer serves.
        A rollback away from the desired version is what the device decided about it."""
        desired = self.desired.applying(change.name) or {}
        if change.event == payloads.ROLLED_BACK and desired.get("version") not in (
            None, change.manifest.version,
        ):  # fmt: skip
            self.desired.decided(change.name, payloads.ROLLED_BACK, change.reason)
        if self.probation is None:
            return
        trial = self.probation.on_trial(change.name)
        if trial is not None and trial.version != change.manifest.version:
            log.info("probation: %s %s ends: %s %s is active now (%s)", change.name,
                     trial.version, change.manifest.version, change.event,
                     change.reason or "activated")  # fmt: skip
            self.probation.end(change.name)

    def _outside(self, model: str, manifest: Manifest, reason: str) -> None:
        """Not in this rollout: say so in an event, in /status and the retained status (and
        a 503 while nothing serves), so nobody has to guess why the device stays put."""
        log.info("delivery: %s %s: %s", model, manifest.version, reason)
        self._event(payloads.NOT_IN_ROLLOUT, manifest, reason=reason)
        self._set_state(model, NOT_IN_ROLLOUT, reason)

    def _downloading(self, manifest: Manifest, dl: PartialDownload) -> None:
        art = manifest.artifact
        self._event(payloads.DOWNLOADING, manifest, chunks=art.chunks, have=len(dl.have),
                    size=art.size)  # fmt: skip
        self._set_state(manifest.name, DOWNLOADING, f"downloading {manifest.version} "
                        f"({len(dl.have)}/{art.chunks} chunks)")  # fmt: skip

    def _falling_back(self, manifest: Manifest, failures: list[tuple[str, str]]) -> None:
        """Every URL failed and the manifest allows broker chunks: say so, URL by URL,
        so the operator learns the origin is broken while the devices still update."""
        art = manifest.artifact
        summary = "; ".join(error for _, error in failures)
        log.warning("artifact %s: no origin served it (%s); broker chunks instead",
                    art.sha256[:12], summary)  # fmt: skip
        self._event(payloads.ARTIFACT_FALLBACK, manifest, artifact_source=payloads.BROKER_CHUNKS,
                    errors=payloads.origin_errors(failures),
                    reason=f"no origin served it ({summary}); broker chunks instead")  # fmt: skip
        self._set_state(manifest.name, DOWNLOADING, f"downloading {manifest.version} from "
                        f"broker chunks: no origin served it ({summary})")  # fmt: skip

    def _nothing_desired(self, model: str) -> None:
        """The desired state was cleared (``edge-fleet unpublish``): the device keeps what
        it serves, and a state that was about the desired manifest no longer stands."""
        if self._handled.pop(model, None) is None:
            return
        self.desired.decided(model, "", "")
        loaded = self.installer.registry.loaded(model) is not None
        if loaded and self.installer.registry.state(model).state in _DESIRED_STATES:
            self._set_state(model, ACTIVE, "no desired state is published")
        else:
            self.mqtt.publish_status()

    # --- outcomes ----------------------------------------------------------------------

    def _refused(self, model: str, manifest: Manifest | None, reason: str, *, final: bool) -> None:
        log.warning("delivery: %s %s refused: %s", model,
                    manifest.version if manifest else "?", reason)  # fmt: skip
        self._event(payloads.REJECTED, manifest, model=model, reason=reason, retry=not final)
        self.desired.decided(model, payloads.REJECTED if final else RETRYING, reason)
        version = manifest.version if manifest else None
        if final:  # the model serves on what it had (if anything): /status says why
            self._set_state(model, REJECTED, _refusal(version, reason))
        else:
            what = version or "the desired manifest"
            self._set_state(model, RETRYING, f"delivery of {what} failed for now: {reason}")

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

    def _canary_failed(self, model: str, version: str, reason: str) -> None:
        """The canary arm regressed against the active arm: drop it, the active version
        serves everything; the desired state stays refused until a new serial."""
        held = self.installer.registry.canary(model)
        if held is None or held[0].version != version:
            return  # the split ended meanwhile (a promotion, another desired state)
        self.installer.registry.clear_canary(model)
        serving = self.installer.registry.loaded(model)
        self._event(payloads.ROLLED_BACK, held[0].manifest, from_version=version,
                    to_version=getattr(serving, "version", None), reason=reason)  # fmt: skip
        self.desired.decided(model, payloads.ROLLED_BACK, f"canary {version} dropped: {reason}")
        self._set_state(model, ACTIVE, f"canary {version} dropped: {reason}")

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
            raise Superseded()

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

    def _remember_rejected(
        self, model: str, fingerprint: str, reason: str, manifest: Manifest | None
    ) -> None:
        self._rejected[model] = {"fingerprint": fingerprint, "reason": reason}
        if manifest is not None:
            self._rejected[model]["version"] = manifest.version
        self._save_state()

    def _forget_rejected(self, model: str) -> None:
        if self._rejected.pop(model, None) is not None:
            self._save_state()

    def _save_state(self) -> None:
        try:
            atomic_write(self.state_path, json.dumps({"rejected": self._rejected}).encode())
        except OSError as e:
            log.warning("delivery: cannot record the refusal in %s: %s", self.state_path, e)


def _source_text(fetched: Fetched) -> str:
    """Where the artifact came from, for the desired state's reason."""
    if fetched.source == payloads.ORIGIN:
        return f"artifact from {fetched.url}"
    if fetched.source == payloads.STORE:
        return "artifact from the store (installed before)"
    if fetched.failures:
        tried = ", ".join(url for url, _ in fetched.failures)
        return f"artifact from broker chunks: no origin served it ({tried})"
    return "artifact from broker chunks"


def _refusal(version: str | None, reason: str) -> str:
    return f"delivery of {version or 'the desired manifest'} refused: {reason}"
