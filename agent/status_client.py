"""The local agent's ``/status``: fetched over HTTP and formatted for a person.

Used by ``edge-agent status`` and by ``edge-agent install``/``rollback`` to see
whether a running agent has picked a change up.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from agent.config import Config
from agent.secrets import read_secret
from agent.wire.errors import EdgeError


def local_url(cfg: Config, path: str) -> str:
    """The agent's URL from this machine: a wildcard listen address means loopback."""
    host = cfg.http.host
    if host in {"0.0.0.0", ""}:
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.http.port}{path}"


def fetch_status(cfg: Config, timeout: float = 3.0) -> dict[str, Any]:
    """GET /status of the local agent; EdgeError when none answers."""
    url = local_url(cfg, "/status")
    request = urllib.request.Request(url)
    if cfg.http.token_file:
        try:
            token = read_secret(cfg.http.token_file)
        except OSError as e:
            raise EdgeError(
                f"http.token_file: cannot read {cfg.http.token_file!r} ({e.strerror}); "
                "run as root or as the agent's user"
            ) from None
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:200]
        raise EdgeError(f"{url}: HTTP {e.code} {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EdgeError(f"no agent answers at {url} ({reason}); is edge-agent running?") from None


def format_status(s: dict[str, Any]) -> str:
    broker = s.get("broker") or {}
    buf = s.get("buffer") or {}
    dropped = {k: v for k, v in (buf.get("dropped") or {}).items() if v}
    oldest = buf.get("oldest_age_s")
    tags = ", ".join(f"{k}={v}" for k, v in sorted((s.get("tags") or {}).items()))
    lines = [
        f"device   {s.get('device')} (fleet {s.get('fleet')}), agent {s.get('agent_version')}"
        + (f", tags {tags}" if tags else ""),
        f"uptime   {_duration(float(s.get('uptime_s') or 0))}",
        f"broker   {broker.get('url') or '-'}: {broker.get('state', '?')}"
        + (f" ({broker['last_error']})" if broker.get("last_error") else ""),
        f"buffer   {buf.get('rows', 0)} results, {_size(int(buf.get('bytes') or 0))}"
        + (f", oldest {_duration(float(oldest))}" if oldest is not None else "")
        + (f"; dropped {', '.join(f'{k} {v}' for k, v in dropped.items())}" if dropped else ""),
        "models" if s.get("models") else "models   none installed",
    ]
    for name, m in sorted((s.get("models") or {}).items()):
        line = f"  {name:<16} {m.get('version') or '-':<10} {m.get('state')}"
        if m.get("previous"):
            line += f" (previous {m['previous']})"
        if m.get("reason"):
            line += f": {m['reason']}"
        lines.append(line)
        desired = m.get("desired") or {}
        if desired.get("version") and desired.get("version") != m.get("version"):
            # Desired against actual: what the broker asks for and what this device decided.
            lines.append(f"  {'':<16} desired {desired['version']} (serial "
                         f"{desired.get('serial')}, {desired.get('source')}): "
                         f"{desired.get('decision') or 'pending'}")  # fmt: skip
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"
