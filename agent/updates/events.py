"""Deployment events on ``edge/devices/{device}/events``, from one publisher.

Delivery reports its steps here (``downloading`` .. ``activated``, ``rejected``,
``not_in_rollout``); every rollback (probation, a device command, ``edge-agent
rollback`` beside the agent, the start-up fallback from a broken version) reaches
``on_change`` from the installer and becomes one ``rolled_back`` event, whoever
caused it. Payloads are built by ``agent.wire.payloads``.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.link import Link
from agent.updates.installer import Change
from agent.wire import payloads
from agent.wire.manifest import Manifest

log = logging.getLogger(__name__)


class Events:
    def __init__(self, device: str, link: Link) -> None:
        self.device = device
        self.link = link
        self.topic = link.topics.events(device)

    def publish(self, name: str, manifest: Manifest | None = None, **fields: Any) -> None:
        """One event; with a manifest it names model, version, serial and artifact."""
        if manifest is not None:
            fields = {"model": manifest.name, "version": manifest.version,
                      "serial": manifest.serial, "sha256": manifest.artifact.sha256,
                      **fields}  # fmt: skip
        payload = payloads.event(self.device, name, **fields)
        # QoS 1: queued by the link while offline, so an event of the start-up (a
        # fallback to the previous version) reaches the broker after the first connect.
        self.link.publish(self.topic, payloads.encode(payload), qos=1)

    def on_change(self, change: Change) -> None:
        """Installer listener: every rollback is announced, whatever asked for it."""
        if change.event != payloads.ROLLED_BACK:
            return
        self.publish(
            payloads.ROLLED_BACK,
            change.manifest,
            from_version=change.previous,
            reason=change.reason or None,
        )
