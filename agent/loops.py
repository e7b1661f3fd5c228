"""Background loops: a named thread, a stop event, a log line when it ends, and an
``alive()`` that means "made progress recently", not "the thread exists".

Every long-running part of the agent (delivery, commands, probation, health, the
forwarder, the store watcher, the buffer's flusher) runs one of these. The systemd
watchdog is pinged only while every loop is alive, so a loop stuck in a call that never
returns gets the agent restarted instead of silently serving stale state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# How long a failing step waits before the next try: a bug must not spin a core.
ERROR_WAIT_S = 1.0


class Loop:
    """Runs ``step`` on a named thread until stopped.

    ``step`` returns how long to wait before it runs again (0: at once); ``wake()``
    cuts the wait short. A step that works for long (a download, a model load) calls
    ``beat()`` as it makes progress. ``alive()`` is true while the thread runs and has
    beaten within ``stall_s``.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], float],
        *,
        stall_s: float,
        first_wait_s: float = 0.0,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.stall_s = stall_s
        self.first_wait_s = first_wait_s
        self._step = step
        self._on_stop = on_stop
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()
        self.steps = 0

    def start(self) -> None:
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: still busy %.0f s after the stop request", self.name, timeout)

    def alive(self) -> bool:
        running = self._thread is not None and self._thread.is_alive()
        return running and time.monotonic() - self._beat < self.stall_s

    def beat(self) -> None:
        """Progress: the loop is not stuck, whatever its step is doing."""
        self._beat = time.monotonic()

    def wake(self) -> None:
        """Run the next step now instead of after the wait."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self, seconds: float | None) -> bool:
        """Sleep inside a step, ended early only by a stop (not by ``wake``); True if stopping."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        wait = self.first_wait_s
        while not self._stop.is_set():
            if wait > 0:
                self._wake.wait(wait)
            # Cleared before the step: a wake during the step cuts the next wait short.
            self._wake.clear()
            if self._stop.is_set():
                break
            self.beat()
            try:
                wait = self._step()
            except Exception:
                log.exception("%s: step failed; trying again", self.name)
                wait = ERROR_WAIT_S
            self.steps += 1
        if self._on_stop is not None:
            try:
                self._on_stop()
            except Exception:
                log.exception("%s: stopping failed", self.name)
        log.info("%s: stopped", self.name)
