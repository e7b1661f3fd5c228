"""Wires the agent: builds every component in order, starts them, stops them in reverse.

The order is the one in docs/architecture.md. Components never import each other;
each gets its collaborators here. The MQTT side (client, forwarder, health, delivery)
exists only when ``mqtt.url`` or ``mqtt.urls`` is set: without a broker the agent serves and buffers.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.config import Config
from agent.metrics import Metrics
from agent.models.registry import Registry
from agent.models.store import ModelStore
from agent.quality.drift import DriftMonitor
from agent.quality.shadow import ShadowRunner
from agent.results.buffer import ResultBuffer
from agent.sdnotify import Notifier, WatchdogLoop
from agent.serving.routes import Service
from agent.serving.server import HttpServer
from agent.updates.installer import Change, Installer
from agent.updates.watcher import StoreWatcher
from agent.wire.errors import EdgeError
from agent.wire.times import rfc3339

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger(__name__)


class Component(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def alive(self) -> bool: ...


class Supervisor:
    """Builds, starts and stops the agent's components; answers /status."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._stop = threading.Event()
        self._stopped = False
        self.mqtt: Any = None
        self.delivery: Any = None

        self.metrics = Metrics()
        self.store = ModelStore(cfg.models_path, keep_versions=cfg.models.keep_versions)
        self.registry = Registry(default=cfg.models.default or None)
        self.installer = Installer(cfg, self.store, self.registry, self.metrics)
        try:
            self.buffer = ResultBuffer(cfg.buffer_path, cfg.buffer, self.metrics)
        except (OSError, sqlite3.Error) as e:
            raise EdgeError(f"buffer.path: {cfg.buffer_path} cannot be opened ({e})") from None
        self.drift = DriftMonitor(cfg.drift, self.metrics) if cfg.drift.enabled else None
        self.shadow = ShadowRunner(cfg.shadow, self.registry, self.metrics)
        self.service = Service(
            cfg, self.registry, self.buffer, self.metrics, status=self.status, drift=self.drift,
            shadow=self.shadow,
        )  # fmt: skip
        self.http = HttpServer(cfg.http, self.service)
        self.watcher = StoreWatcher(self.installer)
        # Started in this order, stopped in reverse; the buffer is closed after all.
        self.components: list[Component] = [self.watcher]
        if self.drift is not None:
            self.components.append(self.drift)
        self.components.append(self.shadow)
        if cfg.mqtt.broker_urls:
            self._build_mqtt()
        self.components.append(self.http)
        # systemd: READY=1 once serving, WATCHDOG=1 only while every loop is alive.
        self.notifier = Notifier()
        self.watchdog = WatchdogLoop(self.notifier, self.alive, status=self.status_line)

    def _build_mqtt(self) -> None:
        # Imported here so an agent without a broker never loads paho.
        from agent.health import HealthReporter
        from agent.paho_link import MqttClient
        from agent.results.forwarder import Forwarder
        from agent.updates.commands import Commands
        from agent.updates.delivery import Delivery
        from agent.updates.events import Events

        cfg = self.cfg
        self.mqtt = MqttClient(cfg, self.metrics, status=self.status)
        forwarder = Forwarder(cfg, self.buffer, self.mqtt, self.metrics)
        health = HealthReporter(
            cfg, self.registry, self.buffer, self.mqtt, self.metrics, drift=self.drift,
            shadow=self.shadow,
        )  # fmt: skip
        events = Events(cfg.device.id, self.mqtt)
        # Before load_all: a fallback at start-up is a rollback the fleet must hear of.
        self.installer.listeners.append(events.on_change)
        delivery = Delivery(
            cfg, self.mqtt, self.installer, self.store, events, metrics=self.metrics
        )
        self.delivery = delivery
        # Any activation but delivery's own ends the trial of the version it replaced.
        self.installer.listeners.append(delivery.on_change)
        commands = Commands(cfg, self.mqtt, self.installer)
        self.components += [self.mqtt, forwarder, health, delivery, commands]
        if delivery.probation is not None:
            self.components.append(delivery.probation)
        if delivery.canary is not None:
            self.components.append(delivery.canary)
            health.canary = delivery.canary
        # Any model change (delivery, `edge-agent install` beside us, start-up fallback)
        # refreshes the retained status the fleet reads.
        mqtt = self.mqtt
        self.installer.listeners.append(lambda _change: mqtt.publish_status())

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Load the store, then start every component; HTTP last so it serves loaded models."""
        t0 = time.monotonic()
        loaded = self.installer.load_all()
        self.installer.listeners.append(self._log_change)
        for component in self.components:
            try:
                component.start()
            except OSError as e:
                if component is not self.http:
                    raise
                raise EdgeError(
                    f"http.host/http.port: cannot listen on {self.cfg.http.host}:"
                    f"{self.cfg.http.port}: {e.strerror or e}"
                ) from None
        log.info(
            "edge-agent %s: device %s, fleet %s, serving %s on http://%s:%s (ready in %.0f ms)",
            __version__,
            self.cfg.device.id,
            self.cfg.device.fleet,
            ", ".join(f"{m.name} {m.version}" for m in self.registry.models()) or "no model",
            *self.address(),
            (time.monotonic() - t0) * 1000,
        )
        if not loaded:
            log.warning("no model installed: install one with `edge-agent install PACKAGE`")
        self._on_ready()

    def address(self) -> tuple[str, int]:
        address = getattr(self.http, "address", None)
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
        return self.cfg.http.host, self.cfg.http.port

    def stop(self) -> None:
        """Stop every component in reverse order; flush and close the buffer last."""
        if self._stopped:
            return
        self._stopped = True
        self._on_stopping()
        for component in reversed(self.components):
            try:
                component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)
        self.buffer.close()
        self.notifier.close()
        log.info("edge-agent stopped")

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Start, block until SIGTERM or SIGINT, stop cleanly."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if on_started is not None:
                on_started()
            self._stop.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def alive(self) -> bool:
        """True while every component's loop is running: the watchdog pings only then."""
        return not self._stopped and all(c.alive() for c in self.components)

    # --- systemd hooks: agent/sdnotify.py plugs in here ------------------------------

    def _on_ready(self) -> None:
        """HTTP serves and the store is loaded: tell systemd (READY=1), start the watchdog."""
        self.notifier.ready(self.status_line())
        self.watchdog.start()

    def _on_stopping(self) -> None:
        """A stop begins: no more watchdog pings, STOPPING=1 so systemd waits for us."""
        self.watchdog.stop()
        self.notifier.stopping("stopping: flushing the result buffer")

    def status_line(self) -> str:
        """One line a person can read (systemd STATUS=)."""
        models = "; ".join(f"serving {m.name} {m.version}" for m in self.registry.models())
        broker = "no broker" if self.mqtt is None else f"broker {self._broker()['state']}"
        backlog = self.buffer.stats().rows
        return f"{models or 'no model'}; {broker}; backlog {backlog}"

    def _log_change(self, change: Change) -> None:
        log.info("model %s: %s %s %s", change.name, change.event, change.manifest.version,
                 change.reason)  # fmt: skip

    # --- /status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The /status body; also what the retained MQTT status is built from."""
        models: dict[str, Any] = {}
        shadows = self.shadow.summaries()
        for name, st in self.registry.status().items():
            try:
                pointer = self.store.active(name)
            except Exception:
                pointer = None
            models[name] = {
                "version": st["version"],
                "previous": pointer.previous if pointer else None,
                "state": st["state"],
                "serial": pointer.serial if pointer else st["serial"],
                "reason": st["reason"],
                "activated_at": pointer.activated_at if pointer else None,
            }
            # What the applicable desired manifest asks, and what this device decided.
            models[name]["desired"] = (
                None if self.delivery is None else self.delivery.desired.applying(name)
            )
            trial = self._trial(name)
            if trial is not None:
                models[name]["probation"] = trial
            if st.get("canary") is not None:
                split = None if self.delivery is None or self.delivery.canary is None else (
                    self.delivery.canary.summary(name))  # fmt: skip
                models[name]["canary"] = split or {
                    "version": st["canary"], "against": st["version"],
                    "traffic": st["canary_traffic"],
                }  # fmt: skip
            if st.get("shadow") is not None:
                # The candidate compared beside it, with the figures a rollout's
                # --promote-if "agreement>=..." weighs from the retained status.
                figures = shadows.get(name) or {}
                models[name]["shadow"] = {
                    "version": st["shadow"],
                    "compared": figures.get("compared", 0),
                    "agreed": figures.get("agreed"),
                }
        stats = self.buffer.stats()
        return {
            "device": self.cfg.device.id,
            "fleet": self.cfg.device.fleet,
            "agent_version": __version__,
            "tags": dict(self.cfg.device.tags),
            # Ids of the publisher keys this device trusts (agent.wire.signing.key_id).
            "trusted_keys": sorted(self.installer.trusted),
            "started_at": rfc3339(self.started_at),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "models": models,
            # Where POST /predict without ?model= goes: models.default, else the first installed.
            "default_model": self.registry.default_name(),
            "broker": self._broker(),
            # What the broker says this device should run, and what delivery made of it.
            "desired": {} if self.delivery is None else self.delivery.desired.snapshot(),
            "buffer": {
                "rows": stats.rows,
                "bytes": stats.bytes,
                "oldest_age_s": stats.oldest_age_s,
                "dropped": stats.dropped,
                "delivered_undeleted": stats.delivered,
            },
        }

    def _trial(self, name: str) -> dict[str, Any] | None:
        """How a version on probation is doing so far, against which version."""
        probation = None if self.delivery is None else self.delivery.probation
        if probation is None:
            return None
        trial = probation.on_trial(name)
        if trial is None:
            return None
        return {
            "against": trial.previous,
            "requests": trial.figures.count,
            "errors": trial.figures.errors,
            "bad_requests": trial.figures.bad_requests,
            "remaining_s": round(max(0.0, trial.until - probation.clock()), 1),
        }

    def _broker(self) -> dict[str, Any]:
        if self.mqtt is None:
            return {"url": None, "connected": False, "state": "offline (no broker configured)"}
        connected = getattr(self.mqtt, "connected", None)
        if callable(connected):
            connected = connected()
        error = getattr(self.mqtt, "last_error", None)
        # The URL connected to (or tried next), the MQTT version, the moves between URLs.
        link = self.mqtt.report() if hasattr(self.mqtt, "report") else {}
        return {
            "url": self.cfg.mqtt.url,
            **link,
            "connected": bool(connected),
            "state": "connected" if connected else "disconnected",
            # Why not, in words that name the key to fix (a wrong CA, a refused password).
            "last_error": None if connected else error,
            # Seconds since the broker last sent anything (PINGRESPs included): a
            # "connected" link that has gone quiet shows here before the keepalive ends it.
            "last_packet_s": self.mqtt.silent_s() if hasattr(self.mqtt, "silent_s") else None,
            "keepalive_s": self.cfg.mqtt.keepalive,
        }
