"""Commands sent to one device: ``edge/devices/{device}/commands/{command}``.

The MQTT callback only queues the request; a named worker thread runs it (a rollback
loads a model, which must not stall paho's network thread) and answers on the
request's MQTT 5 response topic with its correlation data; else, as MQTT 3.1.1 has
neither, on the topic the payload names in ``"reply": {"topic": T, "correlation": C}``
(T under the device's own ``.../responses/``, C echoed in the answer's body); else on
``.../events``. Commands are not retained: persistent intent goes through the retained
desired state.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
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

MAX_CORRELATION = 64  # characters of reply.correlation
_LEVEL = re.compile(r"[^/#+\x00]+")  # one topic level, no wildcard


@dataclass(frozen=True)
class Reply:
    """Where an answer goes when the request has no MQTT 5 response topic."""

    topic: str
    correlation: str | None


def reply_of(args: dict[str, Any], responses: str) -> Reply | None:
    """The request's ``reply`` field, checked: ``topic`` one level under ``responses``
    (the device's own ``{prefix}/devices/{device}/responses``), ``correlation`` a short
    string. Raises BadRequest naming the field."""
    reply = args.get("reply")
    if reply is None:
        return None
    if not isinstance(reply, dict):
        raise BadRequest(f"reply: expected an object with topic and correlation, got {reply!r}")
    topic = reply.get("topic")
    prefix = responses + "/"
    if not (
        isinstance(topic, str)
        and topic.startswith(prefix)
        and _LEVEL.fullmatch(topic[len(prefix) :])
    ):
        raise BadRequest(f"reply.topic: {topic!r} is not valid, expected {prefix}<name>")
    correlation = reply.get("correlation")
    if correlation is not None and not (
        isinstance(correlation, str) and len(correlation) <= MAX_CORRELATION
    ):
        raise BadRequest(
            f"reply.correlation: {correlation!r} is not valid, expected a string of at most"
            f" {MAX_CORRELATION} characters"
        )
    return Reply(topic, correlation)


class Commands:
    """Runs device commands; today ``rollback`` (``{"model": ..., "to"?, "reason"?}``)."""

    def __init__(self, cfg: Config, mqtt: Link, installer: Installer) -> None:
        self.device = cfg.device.id
        self.topics = Topics(cfg.mqtt.topic_prefix)
        # Answers named in a request's reply field go only below this (the ACL's
        # responses/#): a request cannot make the device publish anywhere else.
        self.responses = f"{self.topics.prefix}/devices/{self.device}/responses"
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
        answer, reply = self.run(msg.topic.rsplit("/", 1)[-1], msg.payload)
        self._answer(msg, answer, reply)
        return 0.0

    def _answer(self, msg: Message, answer: dict[str, Any], reply: Reply | None) -> None:
        if msg.response_topic:
            self.mqtt.publish(
                msg.response_topic,
                json.dumps(answer),
                qos=1,
                correlation_data=msg.correlation_data,
            )
        elif reply is not None:
            self.mqtt.publish(reply.topic, json.dumps(answer), qos=1)
        else:
            self.mqtt.publish(self.topics.events(self.device), json.dumps(answer), qos=1)

    # --- the core: testable without a broker ---------------------------------------

    def execute(self, command: str, payload: bytes) -> dict[str, Any]:
        """Run one command; the answer says ``ok`` and the result, or the error."""
        return self.run(command, payload)[0]

    def run(self, command: str, payload: bytes) -> tuple[dict[str, Any], Reply | None]:
        """Run one command: the answer, and the ``reply`` the request named (if valid).

        With a ``reply.correlation`` the answer carries it as ``correlation``. A bad
        ``reply`` fails the command before it runs (answered where there is no reply).
        """
        answer = payloads.event(self.device, payloads.COMMAND, command=command)
        reply: Reply | None = None
        started = time.monotonic()
        try:
            try:
                args = json.loads(payload or b"{}")
            except ValueError as e:
                raise BadRequest(f"command {command}: payload is not JSON ({e})") from None
            if not isinstance(args, dict):
                raise BadRequest(f"command {command}: payload must be a JSON object")
            try:
                reply = reply_of(args, self.responses)
            except BadRequest as e:
                raise BadRequest(f"command {command}: {e}") from None
            if reply is not None and reply.correlation is not None:
                answer["correlation"] = reply.correlation
            handler = self.handlers.get(command)
            if handler is None:
                raise BadRequest(
                    f"command: {command!r} is not known (known: {', '.join(sorted(self.handlers))})"
                )
            answer.update(ok=True, **handler({k: v for k, v in args.items() if k != "reply"}))
        except EdgeError as e:
            answer.update(ok=False, error=str(e))
        answer["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        log.info("command %s: %s", command, "ok" if answer["ok"] else answer["error"])
        return answer, reply

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
