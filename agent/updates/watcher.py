"""Loads versions that another process (``edge-agent install``/``rollback``) activated."""

from __future__ import annotations

from agent.loops import Loop
from agent.updates.installer import Installer

# Reading a few tiny JSON files a second costs nothing.
STORE_POLL_S = 1.0


class StoreWatcher:
    """Polls the store's active pointers and loads what changed."""

    def __init__(self, installer: Installer, interval_s: float = STORE_POLL_S) -> None:
        self.installer = installer
        self.interval_s = interval_s
        # A sync can load a large model: allow it a minute before calling the loop hung.
        self.loop = Loop(
            "store-watch", self._step, stall_s=max(60.0, 10 * interval_s), first_wait_s=interval_s
        )

    def _step(self) -> float:
        self.installer.sync()
        return self.interval_s

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def alive(self) -> bool:
        return self.loop.alive()
