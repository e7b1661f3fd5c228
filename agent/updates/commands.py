"""Commands sent to one device: ``edge/devices/{device}/commands/{command}``.

The MQTT callback only queues the request; a named worker thread runs it (a rollback
loads a model, which must not stall paho's network thread) and answers on the
request's MQTT 5 response topic with its correlation data, or on ``.../events`` when
the request names none. Commands are not retained: persistent intent goes through the
retained desired state.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.loops import Loop
from agent.wire import payloads
from agent.wire.errors import BadRequest, EdgeError
from agent.wire.topics import Topics

if TYPE_CHECKING:
    from agent.link import Link, Message
    from agent.updates.installer import Installer

log = logging.getLogger(__name__)


class Commands:
    """Runs device commands; today ``rollback`` (``{"model": ..., "to"?, "reason"?}``)."""

    def __init__(self, cfg: Config, mqtt: Link, installer: Installer) -> None:
        self.device = cfg.device.id
        self.topics = Topics(cfg.mqtt.topic_prefix)
        self.mqtt = mqtt
        self.installer = installer
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "rollback": self._rollback,
        }
        self._queue: queue.Queue[Message] = queue.Queue(maxsize=100)
        # A rollback loads a model: a minute before the loop counts as hung.
        self.loop = Loop("commands", self._step, stall_s=60.0)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.mqtt.subscribe(self.topics.commands_all(self.device), 1, self._on_command)
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def alive(self) -> bool:
        return self.loop.alive()

    # --- transport -----------------------------------------------------------------

    def _on_command(self, msg: Message) -> None:
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            log.warning("commands: queue full, dropped %s", msg.topic)

    def _step(self) -> float:
        try:
            msg = self._queue.get(timeout=1.0)
        except queue.Empty:
            return 0.0
        self._answer(msg, self.execute(msg.topic.rsplit("/", 1)[-1], msg.payload))
        return 0.0

    def _answer(self, msg: Message, answer: dict[str, Any]) -> None:
        if msg.response_topic:
            self.mqtt.publish(
                msg.response_topic,
                json.dumps(answer),
                qos=1,
                correlation_data=msg.correlation_data,
            )
        else:
            self.mqtt.publish(self.topics.events(self.device), json.dumps(answer), qos=1)

    # --- the core: testable without a broker ---------------------------------------

    def execute(self, command: str, payload: bytes) -> dict[str, Any]:
        """Run one command; the answer says ``ok`` and the result, or the error."""
        answer = payloads.event(self.device, payloads.COMMAND, command=command)
        started = time.monotonic()
        try:
            handler = self.handlers.get(command)
            if handler is None:
                raise BadRequest(
                    f"command: {command!r} is not known (known: {', '.join(sorted(self.handlers))})"
                )
            try:
                args = json.loads(payload or b"{}")
            except ValueError as e:
                raise BadRequest(f"command {command}: payload is not JSON ({e})") from None
            if not isinstance(args, dict):
                raise BadRequest(f"command {command}: payload must be a JSON object")
            answer.update(ok=True, **handler(args))
        except EdgeError as e:
            answer.update(ok=False, error=str(e))
        answer["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        log.info("command %s: %s", command, "ok" if answer["ok"] else answer["error"])
        return answer

    def _rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        model = args.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("command rollback: 'model' must name an installed model")
        to = args.get("to")
        if to is not None and not isinstance(to, str):
            raise BadRequest("command rollback: 'to' must be a version string")
        reason = str(args.get("reason") or "command from the fleet")
        manifest = self.installer.rollback(model, reason=reason, to=to)
        return {"model": manifest.name, "version": manifest.version, "reason": reason}
