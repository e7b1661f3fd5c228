"""Device commands from the operator's side: ``edge-fleet rollback MODEL --device ID``.

A command goes to ``{prefix}/devices/{ID}/commands/{command}`` (QoS 1, never retained:
docs/protocol.md) with a response topic under ``{prefix}/devices/{ID}/responses/`` (the
only place a device may answer) and a correlation token; the device answers there once
it has run it (agent/updates/commands.py). Both go twice: as MQTT 5 properties when the
connection is MQTT 5, and always in the payload's ``reply`` field, the only way under
MQTT 3.1.1 (the device then puts the token in the answer's ``correlation``). Commands
are not queued for an offline device, so one whose retained status says ``offline`` is
refused at once instead of waiting for an answer that cannot come.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

import paho.mqtt.client as mqtt
from agent.wire.errors import EdgeError, UsageError
from agent.wire.names import check_name
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.connection import BrokerOptions, connect, disconnect
from fleet.report import Report
from fleet.retained import PublishRefused, Session
from fleet.targets import closest, read_known


class CommandFailed(EdgeError):
    """The device answered with an error, or did not answer."""


def _known_online(options: BrokerOptions, device: str, fleet: str | None, report: Report) -> None:
    session = Session(options, "command")
    try:
        known = read_known(session)
    finally:
        session.close()
    found = known.devices.get(device)
    if found is None:
        raise CommandFailed(
            f"device {device} is not known: no retained status or enrolment names it "
            f"(known devices: {closest(device, known.devices)})"
        )
    if fleet and found.fleet and found.fleet != fleet:
        report.warn(f"device {device} is in fleet {found.fleet}, not {fleet}")
    if found.state != "online":
        since = f" since {found.since}" if found.since else ""
        raise CommandFailed(
            f"device {device} is {found.state or 'not connected'}{since}: commands are not "
            "queued for it; its retained desired state decides what it runs when it is back"
        )


def send_command(
    options: BrokerOptions, device: str, command: str, args: dict[str, Any], *, timeout: float
) -> dict[str, Any]:
    """Send one command and return the device's answer (``{"ok": ..., ...}``)."""
    t = options.topics
    token = secrets.token_hex(8)
    response_topic = f"{t.prefix}/devices/{device}/responses/fleet-{token}"
    answered = threading.Event()
    answer: dict[str, Any] = {}

    def on_message(msg: mqtt.MQTTMessage) -> None:
        if msg.topic != response_topic:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = {"ok": False, "error": f"answer is not JSON: {msg.payload[:80]!r}"}
        body = body if isinstance(body, dict) else {"ok": False, "error": str(body)}
        # MQTT 5: correlation data; 3.1.1 (or a device answering on reply.topic): the body.
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr != token.encode() and body.pop("correlation", None) != token:
            return
        body.pop("correlation", None)
        answer.update(body)
        answered.set()

    # The subscription is made in on_connect, before connect() returns, and the broker
    # handles our packets in order: it is in place before the command goes out.
    client = connect(options, purpose="command", subscriptions=[(response_topic, 1)],
                     on_message=on_message)  # fmt: skip
    try:
        body = {**args, "reply": {"topic": response_topic, "correlation": token}}
        props = None
        if client.mqtt5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
            props.CorrelationData = token.encode()
        info = client.publish(t.command(device, command), json.dumps(body), qos=1,
                              properties=props)  # fmt: skip
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishRefused(f"command {command} to {device}: {mqtt.error_string(info.rc)}")
        if not answered.wait(timeout):
            raise CommandFailed(
                f"device {device} did not answer the {command} command within {timeout:g} s "
                "(--timeout); it may still run it"
            )
        return answer
    finally:
        disconnect(client)


def rollback_device(
    options: BrokerOptions,
    model: str,
    *,
    device: str,
    fleet: str | None = None,
    to: str | None = None,
    reason: str | None = None,
    timeout: float = 30.0,
    report: Report | None = None,
) -> dict[str, Any]:
    """Roll one device back at once through its ``rollback`` command; returns its answer."""
    report = report or Report()
    for flag, value in (("--device", device), ("MODEL", model)):
        try:
            check_name(flag, value)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if timeout <= 0:
        raise UsageError(f"--timeout: {timeout:g} is not a positive number of seconds")
    _known_online(options, device, fleet, report)
    who = options.username or "an operator"
    args: dict[str, Any] = {"model": model, "reason": reason or f"edge-fleet rollback by {who}"}
    if to:
        args["to"] = to
    answer = send_command(options, device, "rollback", args, timeout=timeout)
    report.facts.update(device=device, command="rollback", answer=answer)
    if not answer.get("ok"):
        raise CommandFailed(f"device {device}: {answer.get('error') or 'refused, no reason given'}")
    report.say(
        f"{device}: {answer.get('model', model)} rolled back to {answer.get('version')} "
        f"({answer.get('reason')}); it stays there until a desired manifest with a new serial "
        "arrives"
    )
    return answer
