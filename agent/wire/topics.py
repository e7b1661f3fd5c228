"""MQTT topic names and the staged-rollout bucket, shared by agent/ and fleet/."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_PREFIX = "edge"


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def fleet_desired(self, fleet: str, model: str) -> str:
        return f"{self.prefix}/fleets/{fleet}/models/{model}/desired"

    def device_desired(self, device: str, model: str) -> str:
        return f"{self.prefix}/devices/{device}/models/{model}/desired"

    def fleet_history(self, fleet: str, model: str) -> str:
        """The publisher's retained history of a fleet's desired manifests (rollback targets)."""
        return f"{self.prefix}/fleets/{fleet}/models/{model}/history"

    def device_history(self, device: str, model: str) -> str:
        return f"{self.prefix}/devices/{device}/models/{model}/history"

    def fleet_rollout(self, fleet: str, model: str) -> str:
        """Operator -> operators: a self-driving rollout's plan and progress (retained;
        devices never read it: they follow the signed desired state alone)."""
        return f"{self.prefix}/fleets/{fleet}/models/{model}/rollout"

    def enrolment(self, device: str) -> str:
        """Operator -> operators: the device's enrolment record (fleet, tags; retained),
        so a publish can tell a typo from a device that has not connected yet."""
        return f"{self.prefix}/devices/{device}/enrolment"

    def artifact_chunk(self, sha256: str, index: int) -> str:
        return f"{self.prefix}/artifacts/{sha256}/{index}"

    def status(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/status"

    def health(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/health"

    def events(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/events"

    def results(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/results"

    def results_ack(self, device: str) -> str:
        """Collector -> device: which result seqs are committed centrally (docs/collector.md)."""
        return f"{self.prefix}/devices/{device}/results/ack"

    def command(self, device: str, command: str) -> str:
        return f"{self.prefix}/devices/{device}/commands/{command}"

    # Subscriptions -------------------------------------------------------------

    def fleet_desired_all(self, fleet: str) -> str:
        return f"{self.prefix}/fleets/{fleet}/models/+/desired"

    def device_desired_all(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/models/+/desired"

    def commands_all(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/commands/+"

    def artifact_all(self, sha256: str) -> str:
        return f"{self.prefix}/artifacts/{sha256}/+"

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def all_health(self) -> str:
        return f"{self.prefix}/devices/+/health"

    def all_events(self) -> str:
        return f"{self.prefix}/devices/+/events"

    def all_rollouts(self) -> str:
        return f"{self.prefix}/fleets/+/models/+/rollout"

    def all_enrolments(self) -> str:
        return f"{self.prefix}/devices/+/enrolment"

    def all_results(self) -> str:
        return f"{self.prefix}/devices/+/results"

    def device_of(self, topic: str) -> str | None:
        """``edge/devices/{device}/...`` -> device, else None."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        n = len(head)
        if parts[:n] == head and len(parts) > n + 1 and parts[n] == "devices":
            return parts[n + 1]
        return None


def rollout_bucket(salt: str, device_id: str) -> int:
    """The device's bucket 0..99: ``int(sha256(salt + device_id)) mod 100``."""
    digest = hashlib.sha256((salt + device_id).encode()).hexdigest()
    return int(digest, 16) % 100


def in_rollout(salt: str, device_id: str, percent: float) -> bool:
    return rollout_bucket(salt, device_id) < percent
