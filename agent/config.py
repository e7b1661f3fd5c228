"""Agent configuration: TOML file, environment overrides, secrets from files.

Every key can be overridden by ``EDGE_AGENT_<SECTION>_<KEY>`` (``EDGE_AGENT_STATE_DIR``
for the top-level ``state_dir``). Secrets are never inline: keys ending in ``_file``
and the TLS files (``mqtt.ca``, ``mqtt.cert``, ``mqtt.key``) name a file, looked up in
systemd's ``$CREDENTIALS_DIRECTORY`` when relative. ``load_config`` replaces the TLS
paths with the files it found, so what it checked is what the connection loads.
Loading fails completely: every bad key is listed with its value and what was expected.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.secrets import missing_file, resolve_secret_path
from agent.wire.errors import ConfigError
from agent.wire.names import NAME_RULE, is_name
from agent.wire.targeting import parse_tags, tags_problem

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "k": 1024, "KiB": 1024, "KB": 1000, "M": 1 << 20, "MiB": 1 << 20,
    "MB": 1_000_000, "G": 1 << 30, "GiB": 1 << 30, "GB": 1_000_000_000,
}  # fmt: skip


@dataclass
class DeviceConfig:
    id: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "device")
    fleet: str = "default"
    # Groups a rollout can target (`where`): [device.tags] site = "north", or the env
    # form EDGE_AGENT_DEVICE_TAGS="site=north,ring=canary". Reported in the status.
    tags: dict[str, str] = field(default_factory=dict)


PROTOCOLS = ("auto", "5", "3.1.1")
MAX_URLS = 16
_URL = re.compile(r"mqtts?://[^/:]+(:\d+)?/?")
_URL_FORM = "mqtt://host[:port] or mqtts://host[:port]"


@dataclass
class MqttConfig:
    url: str = ""  # empty: no broker, the agent serves and buffers offline
    # Several brokers (the nodes of a cluster), tried in this order; wins over `url`.
    urls: list[str] = field(default_factory=list)
    # auto: MQTT 5, and 3.1.1 for a URL whose broker answers that it does not speak 5.
    protocol: str = "auto"
    username: str = ""
    password_file: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""
    client_id: str = ""  # empty: the device id
    # Short for a flaky link: a silent cut is noticed after about two keepalives (paho
    # pings after one, gives up after another), the broker's will after 1.5.
    keepalive: int = 15
    topic_prefix: str = "edge"
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_inflight: int = 20

    @property
    def broker_urls(self) -> list[str]:
        """The brokers to connect to, in failover order; empty: no broker."""
        return list(self.urls) if self.urls else ([self.url] if self.url else [])


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token_file: str = ""
    max_body_bytes: int = 10 * 1024 * 1024
    # Connections served at once; one more gets a fast 503. A thread each: 64 is far
    # more than the local callers of a Pi need, and bounded whatever a client does.
    max_connections: int = 64
    idle_timeout_s: float = 30.0  # a keep-alive connection waiting for its next request
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout_s: float = 30.0  # to receive a whole body


@dataclass
class ModelsConfig:
    default: str = ""
    keep_versions: int = 3
    trusted_keys: list[str] = field(default_factory=list)
    allow_unsigned: bool = False  # with trusted keys configured, unsigned packages are refused
    intra_op_threads: int = 1  # one request per core beats one request over all cores on a Pi
    inter_op_threads: int = 1
    probation_s: float = 300.0
    probation_min_requests: int = 20
    probation_max_error_rate: float = 0.05
    probation_max_latency_ratio: float = 3.0
    delivery_chunk_timeout_s: float = 30.0  # no new chunk for this long: rejected, retried later
    delivery_retry_s: float = 60.0  # wait before retrying a delivery that failed for now


@dataclass
class BufferConfig:
    path: str = ""  # empty: <state_dir>/buffer.db
    max_rows: int = 1_000_000
    max_bytes: int = 256 * 1024 * 1024
    max_age: float = 7 * 86400.0
    batch_size: int = 1000
    record: str = "all"  # all | sample | none
    # What of a request's inputs leaves the device: all, hash (sha256 of their JSON, so
    # equal inputs can still be matched centrally) or none. Outputs are always kept.
    record_inputs: str = "all"
    sample_rate: float = 0.1
    durability: str = "commit"  # commit: committed before the answer; batched: bounded loss window
    flush_interval_ms: int = 200  # the loss window when durability = "batched"


@dataclass
class ForwardConfig:
    # collector: a row leaves the buffer only once the collector acknowledged it is
    # committed centrally (nothing is lost when no one listens). broker: on the broker's
    # PUBACK, for users who run their own consumer of the results topic.
    ack: str = "collector"
    ack_timeout_s: float = 60.0  # no ack this long after the PUBACK: send again
    cpu_share: float = 0.06  # of one core, while draining a backlog (serving comes first)


@dataclass
class HealthConfig:
    interval_s: float = 30.0


@dataclass
class DriftConfig:
    # Live inputs and outputs binned against the manifest's profile, off the request
    # path (agent/quality/drift.py); models without a profile are not watched.
    enabled: bool = True
    report_bytes: int = 2048  # the drift part of one health report, whatever the features
    top_k: int = 5  # features named in full in health; the rest as one aggregate
    min_rows: int = 200  # live rows before a score is reported
    window_rows: int = 10_000  # counts are halved past this: the score follows recent traffic
    queue_batches: int = 256  # answered batches waiting to be binned; more are skipped


@dataclass
class ShadowConfig:
    # A candidate published with --shadow answers a sample of live requests beside the
    # active version, off the request path (agent/quality/shadow.py).
    rate: float = 0.1  # share of answered batches the candidate also runs
    cpu_share: float = 0.25  # of one core, at most, for the candidate's runs
    queue_batches: int = 64  # sampled batches waiting; more are skipped (counted)
    confusion_cells: int = 16  # (active, candidate) label pairs in health at most


@dataclass
class Config:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    state_dir: str = ""
    source: str = field(default="defaults", compare=False)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def buffer_path(self) -> Path:
        return Path(self.buffer.path) if self.buffer.path else self.state_path / "buffer.db"

    @property
    def models_path(self) -> Path:
        return self.state_path / "models"


SECTIONS: dict[str, type] = {
    "device": DeviceConfig,
    "mqtt": MqttConfig,
    "http": HttpConfig,
    "models": ModelsConfig,
    "buffer": BufferConfig,
    "forward": ForwardConfig,
    "health": HealthConfig,
    "drift": DriftConfig,
    "shadow": ShadowConfig,
}

# Values checked beyond their type: key -> (predicate, what was expected)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "device.id": (is_name, f"a plain name ({NAME_RULE})"),
    "device.fleet": (is_name, f"a plain name ({NAME_RULE})"),
    "mqtt.url": (lambda v: v == "" or bool(_URL.fullmatch(v)), f"{_URL_FORM} (or empty for no broker)"),
    "mqtt.protocol": (lambda v: v in PROTOCOLS, "'auto', '5' or '3.1.1'"),
    "mqtt.keepalive": (lambda v: 5 <= v <= 3600, "5..3600 seconds"),
    "mqtt.max_inflight": (lambda v: 1 <= v <= 1000, "1..1000"),
    "mqtt.topic_prefix": (lambda v: bool(re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", v)), "a topic prefix like 'edge'"),
    "http.port": (lambda v: 0 <= v <= 65535, "0..65535"),
    "http.max_body_bytes": (lambda v: v >= 1024, "at least 1024"),
    "http.max_connections": (lambda v: 1 <= v <= 10_000, "1..10000"),
    "http.idle_timeout_s": (lambda v: 0.1 <= v <= 3600, "0.1..3600 seconds"),
    "http.header_timeout_s": (lambda v: 0.1 <= v <= 600, "0.1..600 seconds"),
    "http.body_timeout_s": (lambda v: 0.1 <= v <= 3600, "0.1..3600 seconds"),
    "models.keep_versions": (lambda v: v >= 2, "at least 2 (the active one and one to roll back to)"),
    "models.intra_op_threads": (lambda v: 0 <= v <= 64, "0..64 (0: onnxruntime decides)"),
    "models.inter_op_threads": (lambda v: 0 <= v <= 64, "0..64 (0: onnxruntime decides)"),
    "models.probation_max_error_rate": (lambda v: 0 <= v <= 1, "0..1"),
    "models.probation_max_latency_ratio": (lambda v: v >= 1, "at least 1"),
    "models.delivery_chunk_timeout_s": (lambda v: v > 0, "a positive duration"),
    "models.delivery_retry_s": (lambda v: v > 0, "a positive duration"),
    "buffer.max_rows": (lambda v: v >= 1, "at least 1"),
    "buffer.max_bytes": (lambda v: v >= 65536, "at least 64 KiB"),
    "buffer.max_age": (lambda v: v > 0, "a positive duration"),
    "buffer.batch_size": (lambda v: 1 <= v <= 100_000, "1..100000"),
    "buffer.record": (lambda v: v in {"all", "sample", "none"}, "'all', 'sample' or 'none'"),
    "buffer.record_inputs": (lambda v: v in {"all", "hash", "none"}, "'all', 'hash' or 'none'"),
    "forward.ack": (lambda v: v in {"collector", "broker"}, "'collector' or 'broker'"),
    "forward.ack_timeout_s": (lambda v: 1 <= v <= 86400, "1 s..1 day"),
    "forward.cpu_share": (lambda v: 0 < v <= 1, "0 < share <= 1"),
    "buffer.sample_rate": (lambda v: 0 < v <= 1, "0 < rate <= 1"),
    "buffer.durability": (lambda v: v in {"commit", "batched"}, "'commit' or 'batched'"),
    "buffer.flush_interval_ms": (lambda v: 1 <= v <= 60_000, "1..60000"),
    "health.interval_s": (lambda v: v >= 1, "at least 1 second"),
    "drift.report_bytes": (lambda v: 256 <= v <= 65536, "256..65536 bytes"),
    "drift.top_k": (lambda v: 0 <= v <= 100, "0..100"),
    "drift.min_rows": (lambda v: v >= 1, "at least 1"),
    "drift.window_rows": (lambda v: v >= 100, "at least 100"),
    "drift.queue_batches": (lambda v: 1 <= v <= 100_000, "1..100000"),
    "shadow.rate": (lambda v: 0 <= v <= 1, "0..1 (0: no shadow runs)"),
    "shadow.cpu_share": (lambda v: 0 < v <= 1, "0 < share <= 1"),
    "shadow.queue_batches": (lambda v: 1 <= v <= 100_000, "1..100000"),
    "shadow.confusion_cells": (lambda v: 1 <= v <= 256, "1..256"),
}  # fmt: skip

_DURATION_KEYS = {
    "buffer.max_age", "health.interval_s", "models.probation_s",
    "models.delivery_chunk_timeout_s", "models.delivery_retry_s",
    "http.idle_timeout_s", "http.header_timeout_s", "http.body_timeout_s",
    "forward.ack_timeout_s",
}  # fmt: skip
_SIZE_KEYS = {"buffer.max_bytes", "http.max_body_bytes", "drift.report_bytes"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
TLS_FILE_KEYS = ("ca", "cert", "key")  # [mqtt] keys naming files, resolved like secrets


def _coerce(key: str, value: Any, default: Any, problems: list[str]) -> Any:
    """Turn a TOML or environment value into the type of ``default``."""
    kind = type(default)
    if key == "mqtt.protocol" and type(value) is int:
        value = str(value)  # protocol = 5 in TOML
    try:
        if key in _DURATION_KEYS and isinstance(value, str):
            m = _DURATION.match(value)
            if not m:
                raise ValueError
            return kind(float(m.group(1)) * _UNITS[m.group(2)])
        if key in _SIZE_KEYS and isinstance(value, str):
            m = _SIZE.match(value)
            if not m:
                raise ValueError
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return int(value)
            raise ValueError
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int | float):
                return float(value)
            if isinstance(value, str):
                return float(value)
            raise ValueError
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
        if kind is str:
            if isinstance(value, str):
                return value
            raise ValueError
        if kind is dict:
            tags = parse_tags(value, key) if isinstance(value, str) else value
            problem = tags_problem(key, tags)
            if problem is not None:
                problems.append(problem)
                return default
            return dict(tags)
    except ValueError as e:
        if kind is dict and str(e):  # parse_tags names the item that is wrong
            problems.append(str(e))
            return default
    expected = {bool: "true or false", int: "an integer", float: "a number", list: "a list of strings", str: "a string", dict: "a table"}[kind]  # fmt: skip
    if key in _DURATION_KEYS:
        expected = "a duration (seconds, or like '30s', '5m', '7d')"
    if key in _SIZE_KEYS:
        expected = "a size in bytes (or like '10MiB')"
    problems.append(f"{key}: {value!r} is not valid, expected {expected}")
    return default


def _env_key(section: str | None, key: str) -> str:
    return f"EDGE_AGENT_{section.upper()}_{key.upper()}" if section else f"EDGE_AGENT_{key.upper()}"


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config from ``path`` (default: /etc/edge-agent/agent.toml if it exists).

    A missing file at the default path means safe defaults; a missing file that was asked
    for by name is an error. Raises ConfigError listing every problem.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    data: dict[str, Any] = {}
    cfg = Config()
    explicit = path is not None or "EDGE_AGENT_CONFIG" in env
    file = (
        Path(path) if path is not None else Path(env.get("EDGE_AGENT_CONFIG", DEFAULT_CONFIG_PATH))
    )
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
            cfg.source = str(file)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError([f"{file}: not valid TOML ({e})"]) from None
        except OSError as e:
            raise ConfigError([f"{file}: cannot be read ({e.strerror})"]) from None
    elif explicit:
        raise ConfigError([f"{file}: no such configuration file"])

    for key in data:
        if key not in SECTIONS and key != "state_dir":
            problems.append(
                f"{key}: unknown key or section (known: {', '.join([*SECTIONS, 'state_dir'])})"
            )

    for section, klass in SECTIONS.items():
        section_obj = getattr(cfg, section)
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            problems.append(f"{section}: expected a [{section}] table, got {raw!r}")
            raw = {}
        names = {f.name for f in fields(klass)}
        for key in raw:
            if key not in names:
                problems.append(f"{section}.{key}: unknown key (known: {', '.join(sorted(names))})")
        for f in fields(klass):
            full = f"{section}.{f.name}"
            default = getattr(section_obj, f.name)
            value: Any = raw.get(f.name, default)
            env_name = _env_key(section, f.name)
            if env_name in env:
                value = env[env_name]
            if value is not default:
                value = _coerce(full, value, default, problems)
            setattr(section_obj, f.name, value)

    state = data.get("state_dir", "")
    state = env.get("EDGE_AGENT_STATE_DIR", state)
    if not isinstance(state, str):
        problems.append(f"state_dir: {state!r} is not valid, expected a folder path")
        state = ""
    cfg.state_dir = state or env.get("STATE_DIRECTORY", "").split(":")[0] or "./edge-agent-state"

    problems.extend(validate(cfg, env))
    if problems:
        raise ConfigError(problems)
    # paho opens these itself, relative to the working folder: hand it the file that
    # validate() found, in $CREDENTIALS_DIRECTORY under systemd.
    for key in TLS_FILE_KEYS:
        value = getattr(cfg.mqtt, key)
        if value:
            setattr(cfg.mqtt, key, str(resolve_secret_path(value, env)))
    return cfg


def validate(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    problems: list[str] = []
    for full, (check, expected) in _CHECKS.items():
        section, key = full.split(".")
        value = getattr(getattr(cfg, section), key)
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{full}: {value!r} is not valid, expected {expected}")
    if cfg.mqtt.reconnect_min_s > cfg.mqtt.reconnect_max_s:
        problems.append(
            f"mqtt.reconnect_min_s: {cfg.mqtt.reconnect_min_s} is above "
            f"mqtt.reconnect_max_s {cfg.mqtt.reconnect_max_s}"
        )
    problems.extend(_url_problems(cfg.mqtt))
    if bool(cfg.mqtt.cert) != bool(cfg.mqtt.key):
        problems.append("mqtt.cert / mqtt.key: a client certificate needs both cert and key")
    for key in ("password_file", *TLS_FILE_KEYS):
        value = getattr(cfg.mqtt, key)
        if value and not resolve_secret_path(value, env).is_file():
            problems.append(missing_file(f"mqtt.{key}", value, env))
    if cfg.mqtt.password_file and not cfg.mqtt.username:
        problems.append("mqtt.password_file: set, but mqtt.username is empty")
    if cfg.http.token_file and not resolve_secret_path(cfg.http.token_file, env).is_file():
        problems.append(missing_file("http.token_file", cfg.http.token_file, env))
    for i, key_path in enumerate(cfg.models.trusted_keys):
        if not resolve_secret_path(key_path, env).is_file():
            problems.append(missing_file(f"models.trusted_keys[{i}]", key_path, env))
    return problems


def _url_problems(m: MqttConfig) -> list[str]:
    """``mqtt.urls``: 1..16 distinct broker URLs of one scheme; ``mqtt.url`` agrees."""
    if not m.urls:
        return []
    problems = []
    if len(m.urls) > MAX_URLS:
        problems.append(f"mqtt.urls: {len(m.urls)} URLs, expected 1..{MAX_URLS}")
    for i, url in enumerate(m.urls):
        if not _URL.fullmatch(url):
            problems.append(f"mqtt.urls[{i}]: {url!r} is not valid, expected {_URL_FORM}")
        elif url in m.urls[:i]:
            problems.append(f"mqtt.urls[{i}]: {url!r} is already mqtt.urls[{m.urls.index(url)}]")
    schemes = {url.split(":", 1)[0] for url in m.urls if _URL.fullmatch(url)}
    if len(schemes) > 1:
        # One TLS set-up (mqtt.ca, mqtt.cert, mqtt.key) serves every URL.
        problems.append(
            f"mqtt.urls: mixes mqtt:// and mqtts:// ({', '.join(m.urls)}); use one scheme for all"
        )
    if m.url and m.url != m.urls[0]:
        problems.append(
            f"mqtt.url / mqtt.urls: both set, and mqtt.url ({m.url!r}) is not the first of"
            f" mqtt.urls ({m.urls[0]!r}); keep only mqtt.urls"
        )
    return problems
