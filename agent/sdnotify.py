"""sd_notify(3) without a dependency: READY, STATUS, WATCHDOG, STOPPING.

Under systemd (``Type=notify``) the service manager hands the agent a datagram socket
in ``$NOTIFY_SOCKET`` and, with ``WatchdogSec=``, a deadline in ``$WATCHDOG_USEC``.
Outside systemd every call here is a cheap no-op, so the agent runs the same from a
shell, in a container or in tests.

The watchdog loop is the point of the module: it pings only while a liveness
callback says every component's loop is alive, so a hung HTTP or forwarder loop stops
the pings and systemd restarts the agent, instead of a healthy-looking ping thread
hiding a dead daemon.

Logs: under journald (``$JOURNAL_STREAM`` names our stderr) lines carry a ``<N>``
priority prefix (sd-daemon(3)) and no timestamp, since journald adds its own.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; silent when there is none."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        # A leading "@" means the Linux abstract namespace: the name starts with NUL.
        self.address = "\0" + raw[1:] if raw.startswith("@") else raw
        self.watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the deadline, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when not delivered."""
        if not self.address:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                # Never block: with systemd's queue full (it reads promptly, but a
                # stalled manager must not stall the watchdog thread) drop the message.
                self._sock.sendto(message, socket.MSG_DONTWAIT, self.address)
            except OSError as e:
                # Never fatal: a lost notification costs a restart at worst, a raised
                # one here would take the agent down with it.
                log.warning("sd_notify to %r failed: %s", self.address.lstrip("\0"), e)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class WatchdogLoop:
    """A named thread that pings systemd while ``alive()`` is True.

    ``alive`` is the supervisor's ``lambda: all(c.alive() for c in components)``; an
    exception from it counts as not alive. With ``status``, the same loop keeps the
    ``STATUS=`` line of ``systemctl status`` current (sent only when it changes).
    Runs only under systemd; pings only when systemd asked for a watchdog.
    """

    def __init__(
        self,
        notifier: Notifier,
        alive: Callable[[], bool],
        *,
        status: Callable[[], str] | None = None,
        interval_s: float | None = None,
        status_interval_s: float = 10.0,
    ) -> None:
        self.notifier = notifier
        self.alive = alive
        self.status = status
        self.watchdog_s = interval_s or notifier.watchdog_interval_s
        self.interval_s = min(self.watchdog_s or status_interval_s, status_interval_s)
        self.pings = 0
        self.checks = 0  # liveness checks made (pinged or not)
        self._last_status: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.notifier.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _check(self) -> bool:
        self.checks += 1
        try:
            return bool(self.alive())
        except Exception:
            log.exception("watchdog liveness check failed")
            return False

    def _refresh_status(self) -> None:
        if self.status is None:
            return
        try:
            text = self.status()
        except Exception:
            log.exception("status line failed")
            return
        if text != self._last_status and self.notifier.status(text):
            self._last_status = text

    def _run(self) -> None:
        if self.watchdog_s:
            log.info(
                "watchdog: pinging systemd every %.1fs while all loops are alive", self.watchdog_s
            )
        healthy = True
        next_ping = 0.0  # at once: the deadline started when READY=1 was sent
        while True:
            now = time.monotonic()
            if self.watchdog_s and now >= next_ping:
                next_ping = now + self.watchdog_s
                if self._check():
                    if not healthy:
                        log.warning("watchdog: all loops alive again, pings resumed")
                    healthy = True
                    if self.notifier.watchdog():
                        self.pings += 1
                elif healthy:
                    # Said once, not every interval: the restart is coming anyway.
                    log.error("watchdog: a component loop is not alive; pings stopped")
                    healthy = False
            # After the ping: a slow status line must not delay it.
            self._refresh_status()
            if self._stop.wait(self.interval_s):
                break
        log.info("watchdog loop ended after %d pings", self.pings)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    # The watchdog is meant for the main process, not for a child that inherited it.
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- logs that journald keeps well ----------------------------------------------------

# sd-daemon(3) priorities: journald reads a "<N>" prefix as the line's syslog level.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """``<6>agent.http: message``: level as a priority prefix, no timestamp."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
        text = super().format(record)
        prefix = f"<{_PRIORITY[level]}>"
        # A traceback spans lines; each line is its own journal entry, so each gets
        # the prefix or the continuation lines would drop to the default level.
        return "\n".join(prefix + line for line in text.splitlines())


def under_journald(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd connected."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def log_formatter(stream: TextIO | None = None) -> logging.Formatter:
    """The formatter the CLI installs: journal style under systemd, timestamps otherwise."""
    if under_journald(stream):
        return JournalFormatter()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    return formatter
