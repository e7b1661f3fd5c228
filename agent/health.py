"""Health reports: every ``health.interval_s`` to ``edge/devices/{id}/health`` and /metrics.

Collectors read psutil (CPU, load, memory, the agent's RSS, free disk of the state
folder), the board's thermal zone where it has one, the inference window (count,
errors, p50/p99 per model since the last report), the buffer and the MQTT client.
The last report is also exposed as gauges, so /metrics and the fleet see the same
numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.config import Config
from agent.disk import free_bytes
from agent.loops import Loop
from agent.wire import payloads

if TYPE_CHECKING:
    from agent.link import Link
    from agent.metrics import InferenceWindow, Metrics
    from agent.models.registry import Registry
    from agent.quality.drift import DriftMonitor
    from agent.quality.shadow import ShadowRunner
    from agent.results.buffer import ResultBuffer
    from agent.updates.canary import CanaryJudge

log = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
# Zone types that are the SoC on common boards (Raspberry Pi: cpu-thermal).
_SOC_ZONE_HINTS = ("cpu", "soc", "x86_pkg")


def soc_temperature(root: Path = THERMAL_ROOT) -> float | None:
    """The SoC temperature in °C from the thermal zones, or None on boards without one."""
    zones = sorted(root.glob("thermal_zone*"))
    if not zones:
        return None

    def kind(zone: Path) -> str:
        try:
            return (zone / "type").read_text().strip().lower()
        except OSError:
            return ""

    zones.sort(key=lambda z: not any(h in kind(z) for h in _SOC_ZONE_HINTS))
    for zone in zones:
        try:
            return round(int((zone / "temp").read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue  # some zones refuse reads (ENODATA) when their sensor is off
    return None


class HealthReporter:
    """The health loop; one named thread."""

    def __init__(
        self,
        cfg: Config,
        registry: Registry,
        buffer: ResultBuffer,
        mqtt: Link | None,
        metrics: Metrics | None = None,
        *,
        thermal_root: Path = THERMAL_ROOT,
        drift: DriftMonitor | None = None,
        shadow: ShadowRunner | None = None,
    ) -> None:
        self.cfg = cfg
        self.drift = drift
        self.shadow = shadow
        self.canary: CanaryJudge | None = None  # set by the supervisor with delivery
        self.registry = registry
        self.buffer = buffer
        self.mqtt = mqtt
        self.metrics = metrics
        self.interval_s = cfg.health.interval_s
        self.thermal_root = thermal_root
        self.topic = f"{cfg.mqtt.topic_prefix}/devices/{cfg.device.id}/health"
        self.window: InferenceWindow | None = (
            metrics.inference.subscribe() if metrics is not None else None
        )
        self._proc = psutil.Process()
        # The first cpu_percent call measures nothing and returns 0: prime both now so
        # the first report covers the time since start.
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)
        self.last: dict[str, Any] | None = None
        self.reports = 0
        self._shadowing = False
        # A first report soon after start-up, so the fleet sees a new device at once.
        self.loop = Loop(
            "health",
            self._step,
            stall_s=max(60.0, 3 * self.interval_s),
            first_wait_s=min(self.interval_s, 2.0),
        )
        if metrics is not None:
            metrics.registry.register(HealthCollector(self))

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        log.info("health: reporting every %.0f s to %s", self.interval_s, self.topic)
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(5)
        if self.window is not None and self.metrics is not None:
            self.metrics.inference.unsubscribe(self.window)

    def alive(self) -> bool:
        return self.loop.alive()

    def _step(self) -> float:
        self.report()
        return self.interval_s

    # --- the report ------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Collect, keep for /metrics, publish (QoS 1) when connected; return the payload."""
        payload = self.collect()
        self.last = payload
        self.reports += 1
        # Not queued while offline: a late health report is worse than none.
        if self.mqtt is not None and self.mqtt.connected:
            self.mqtt.publish(self.topic, payloads.encode(payload), qos=1)
            if self._shadowing:
                # The retained status carries the shadow figures a rollout step weighs
                # (--promote-if "agreement>=..."): renewed with each report while a
                # candidate is compared.
                self.mqtt.publish_status()
        return payload

    def collect(self) -> dict[str, Any]:
        """The health payload of docs/protocol.md; takes the inference window."""
        self._shadowing = False
        mem = psutil.virtual_memory()
        try:
            load = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load = [None, None, None]  # type: ignore[list-item]
        stats = self.buffer.stats()
        fields: dict[str, Any] = {
            "uptime_s": round(time.time() - self._proc.create_time(), 1),
            "cpu_percent": psutil.cpu_percent(None),
            "agent_cpu_percent": round(self._proc.cpu_percent(None), 1),
            "load": load,
            "memory": {
                "used": int(mem.total - mem.available),
                "available": int(mem.available),
                "agent_rss": int(self._proc.memory_info().rss),
            },
            "disk_free_bytes": free_bytes(self.cfg.state_path),
            "soc_temp_c": soc_temperature(self.thermal_root),
            "models": self._models(),
            "buffer": {
                "rows": stats.rows,
                "bytes": stats.bytes,
                "oldest_age_s": None
                if stats.oldest_age_s is None
                else round(stats.oldest_age_s, 3),
                "dropped": dict(stats.dropped),
                # Delivered, but a full disk kept them from being deleted yet.
                "delivered_undeleted": stats.delivered,
            },
            "mqtt": {
                "connected": bool(self.mqtt and self.mqtt.connected),
                "reconnects": self.mqtt.reconnects if self.mqtt else 0,
            },
            "forwarded": self._sample("edge_forwarded_results_total"),
            "forward_rate": self._sample("edge_forward_rate"),
            # Who deletes a forwarded row: the collector's ack (rows = unacked backlog)
            # or the broker's PUBACK; and how often no collector answered in time.
            "forward_ack": self.cfg.forward.ack,
            "forward_ack_timeouts": self._sample("edge_forward_ack_timeouts_total"),
        }
        return payloads.health(self.cfg.device.id, self.cfg.device.fleet, fields)

    def _models(self) -> dict[str, Any]:
        window = self.window.take() if self.window is not None else {}
        out: dict[str, Any] = {}
        for name in self.registry.names():
            model = self.registry.loaded(name)
            out[name] = _model_entry(model.version if model else None)
        if self.drift is not None:
            for name, section in self.drift.summaries().items():
                if name in out:
                    out[name]["drift"] = section
        if self.canary is not None:
            for name, entry in out.items():
                split = self.canary.summary(name)
                if split is not None:
                    entry["canary"] = split  # both arms of a traffic split
        if self.shadow is not None:
            for name, section in self.shadow.summaries().items():
                if name in out:
                    out[name]["shadow"] = section
                    self._shadowing = True
        # Requests of an old version finishing after a swap count towards the model;
        # the percentiles are those of the version that served the most.
        best: dict[str, int] = {}
        for (name, version), s in sorted(window.items()):
            entry = out.setdefault(name, _model_entry(version))
            entry["inferences"] += s.count
            entry["errors"] += s.errors
            entry["bad_requests"] += s.bad_requests
            if s.count > best.get(name, -1):
                best[name] = s.count
                entry["p50_ms"] = None if s.p50_ms is None else round(s.p50_ms, 3)
                entry["p99_ms"] = None if s.p99_ms is None else round(s.p99_ms, 3)
        return out

    def _sample(self, name: str) -> float | int:
        if self.metrics is None:
            return 0
        value = self.metrics.registry.get_sample_value(name)
        if value is None:
            return 0
        return int(value) if float(value).is_integer() else round(value, 1)


def _model_entry(version: str | None) -> dict[str, Any]:
    """One model of a report: ``errors`` are the model's own failures, ``bad_requests``
    the callers' refused requests (4xx), apart so that a bad client is not a bad model."""
    return {"version": version, "inferences": 0, "errors": 0, "bad_requests": 0,
            "p50_ms": None, "p99_ms": None}  # fmt: skip


class HealthCollector(Collector):
    """The last health report as gauges on /metrics."""

    def __init__(self, reporter: HealthReporter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterable[Any]:
        r = self.reporter.last
        yield CounterMetricFamily(
            "edge_health_reports", "Health reports made", value=self.reporter.reports
        )
        if r is None:
            return
        g = GaugeMetricFamily
        yield g("edge_device_cpu_percent", "System CPU use over the last report interval",
                r["cpu_percent"])  # fmt: skip
        yield g("edge_agent_cpu_percent", "The agent's CPU use over the last report interval",
                r["agent_cpu_percent"])  # fmt: skip
        load = g("edge_device_load", "Load average", labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), r["load"], strict=True):
            if value is not None:
                load.add_metric([period], value)
        yield load
        mem = r["memory"]
        yield g("edge_device_memory_used_bytes", "Memory in use (total - available)", mem["used"])
        yield g("edge_device_memory_available_bytes", "Memory available", mem["available"])
        yield g("edge_agent_rss_bytes", "Resident memory of the agent", mem["agent_rss"])
        if r["disk_free_bytes"] is not None:
            yield g("edge_device_disk_free_bytes", "Free space of the state folder's disk",
                    r["disk_free_bytes"])  # fmt: skip
        if r["soc_temp_c"] is not None:
            yield g("edge_device_soc_temperature_celsius", "SoC temperature", r["soc_temp_c"])
        p50 = g("edge_model_latency_p50_ms", "Median latency over the last report interval",
                labels=["model", "version"])  # fmt: skip
        p99 = g("edge_model_latency_p99_ms", "p99 latency over the last report interval",
                labels=["model", "version"])  # fmt: skip
        count = g("edge_model_inferences_interval", "Inferences in the last report interval",
                  labels=["model", "version"])  # fmt: skip
        errors = g("edge_model_errors_interval",
                   "Inferences the model failed (not the caller) in the last report interval",
                   labels=["model", "version"])  # fmt: skip
        bad = g("edge_model_bad_requests_interval",
                "Requests refused as the caller's mistake (4xx) in the last report interval",
                labels=["model", "version"])  # fmt: skip
        for name, m in r["models"].items():
            labels = [name, str(m["version"])]
            count.add_metric(labels, m["inferences"])
            errors.add_metric(labels, m["errors"])
            bad.add_metric(labels, m.get("bad_requests", 0))
            if m["p50_ms"] is not None:
                p50.add_metric(labels, m["p50_ms"])
            if m["p99_ms"] is not None:
                p99.add_metric(labels, m["p99_ms"])
        yield from (p50, p99, count, errors, bad)
