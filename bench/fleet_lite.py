"""Light simulated devices for ``bench/fleet.py --device lite``: thousands on one asyncio loop.

The agent's own simulated device (bench/fleet_devices.py: paho, the delivery loop, the
installer) costs 50-75 ms of CPU per device and update on this machine (measured with
``--devices 300`` and ``1000``: 15.7 and 66-75 CPU-s), spread over paho's packet code,
JSON, paths and the installer's bookkeeping (py-spy, no single hot spot): 5000 of them
need 250-375 CPU-s, more than 2 cores give in 60 s, where real devices each bring their
own CPU. A light device keeps what an update costs the broker and the origin, and what
must be each device's own:

- its own TCP connection and MQTT session (client id, account, keepalive), speaking MQTT
  5 or 3.1.1 as the agent does: CONNECT with the will the agent sets, SUBSCRIBE QoS 1 to
  its fleet's and its own desired state (a refused subscription is retried, as
  agent/link_subscriptions.py does), a PUBACK for each QoS 1 delivery, its deployment
  events published QoS 1 on its own events topic;
- the agent's own checks, from agent/wire and agent/updates/plan.py: ``parse_manifest``,
  ``verify_signature`` (ed25519, the device's trusted key), ``plan.decide`` (the rollout
  bucket, the serial), then the artifact from the broker's chunks (its own subscription
  to ``artifacts/{sha256}/+``) or from the origin (its own HTTP/1.1 connection, a Range
  request), each chunk's length, the size and the sha256 checked, and the file written
  into its own state folder (a temporary file renamed). A new serial of an artifact it
  holds is activated without a download, as the agent's store does.

Left out, and said so in the bench's output: paho and the threads, the onnxruntime
session and the parity check, the registry, probation, the status and health reports,
and failover (a light device uses the first URL of its list).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import struct
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any

KEEPALIVE_S = 60
CONNECTING_AT_ONCE = 200  # a SYN burst of thousands overflows the broker's listen backlog
SUBSCRIBE_BACKOFF_MAX_S = 10.0
CHUNK_WAIT_S = 60.0
ACK_WAIT_S = 30.0  # a SUBACK later than this: ask again
# Reading pauses above twice this: big enough not to pause on every 1 MB message, small
# enough that 5000 connections do not each hold megabytes of buffer.
READ_LIMIT = 256 * 1024
NICE = 5


Inbox = asyncio.Queue[tuple[str, memoryview]]


class MqttError(Exception):
    """The broker refused or broke the session; the message says how."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _text(s: str) -> bytes:
    data = s.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


class Session:
    """One MQTT connection: the packets a device needs, MQTT 5 or 3.1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, v5: bool):
        self.reader, self.writer, self.v5 = reader, writer, v5
        self._next_id = 0
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self.handlers: list[tuple[str, Inbox]] = []

    @classmethod
    async def open(cls, url: str, client_id: str, username: str, password: str,
                   v5: bool, will: tuple[str, bytes]) -> Session:  # fmt: skip
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(
            parts.hostname, parts.port or 1883, limit=READ_LIMIT
        )
        session = cls(reader, writer, v5)
        none = b"\x00" if v5 else b""  # an empty property list
        flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02  # user, password, will retain qos1, clean
        body = _text("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", KEEPALIVE_S)
        body += none + _text(client_id) + none + _text(will[0])
        body += struct.pack("!H", len(will[1])) + will[1] + _text(username) + _text(password)
        writer.write(_packet(0x10, body))
        kind, ack = await session._read()
        if kind != 0x20 or len(ack) < 2:
            raise MqttError(f"expected CONNACK, got packet type {kind >> 4}")
        if ack[1]:
            raise MqttError(f"broker refused the connection: reason code {ack[1]:#x}")
        return session

    async def _read(self) -> tuple[int, bytes]:
        first = (await self.reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await self.reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await self.reader.readexactly(length) if length else b""

    def _pid(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def _request(self, first: int, body_after_id: bytes, topic: str | None = None) -> bytes:
        """Send a packet with an id (a PUBLISH: after its ``topic``); wait for its ack."""
        pid = self._pid()
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[pid] = done
        head = b"" if topic is None else _text(topic)
        self.writer.write(_packet(first, head + struct.pack("!H", pid) + body_after_id))
        try:
            return await asyncio.wait_for(done, ACK_WAIT_S)
        finally:
            self._acks.pop(pid, None)

    async def subscribe(self, topic: str, into: Inbox) -> None:
        """Subscribe QoS 1 until the broker grants it, as agent/link_subscriptions.py does:
        NATS refuses (SUBACK 0x80) or answers late while it makes the JetStream consumer,
        and thousands of sessions subscribing at once keep it busy for a while."""
        self.handlers.append((topic, into))
        wait = 1.0
        while True:
            body = (b"\x00" if self.v5 else b"") + _text(topic) + b"\x01"
            with contextlib.suppress(TimeoutError):
                if (await self._request(0x82, body))[-1] < 0x80:
                    return
            await asyncio.sleep(wait * random.uniform(0.5, 1.0))
            wait = min(wait * 2, SUBSCRIBE_BACKOFF_MAX_S)

    async def unsubscribe(self, topic: str) -> None:
        self.handlers = [h for h in self.handlers if h[0] != topic]
        await self._request(0xA2, (b"\x00" if self.v5 else b"") + _text(topic))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1; the PUBACK is read and dropped (the agent does not wait for it either)."""
        body = _text(topic) + struct.pack("!H", self._pid()) + (b"\x00" if self.v5 else b"")
        self.writer.write(_packet(0x32 | retain, body + payload))

    async def publish_acked(self, topic: str, payload: bytes) -> None:
        """QoS 1, until its PUBACK: what a publisher that keeps a window does."""
        body = (b"\x00" if self.v5 else b"") + payload
        await self._request(0x32, body, topic)

    async def pinger(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S / 2)
            self.writer.write(b"\xc0\x00")

    async def reads(self) -> None:
        """Every packet from the broker, until the connection ends."""
        while True:
            first, body = await self._read()
            kind = first & 0xF0
            if kind == 0x30:
                self._deliver(first, body)
            elif kind in (0x40, 0x90, 0xB0):  # PUBACK, SUBACK, UNSUBACK: a waiter's future
                (pid,) = struct.unpack_from("!H", body)
                done = self._acks.pop(pid, None)
                if done is not None and not done.done():
                    done.set_result(body[2:])
            # PINGRESP: nothing to do

    def _deliver(self, first: int, body: bytes) -> None:
        (n,) = struct.unpack_from("!H", body)
        topic, pos = body[2 : 2 + n].decode(), 2 + n
        if (first >> 1) & 3:
            (pid,) = struct.unpack_from("!H", body, pos)
            pos += 2
            self.writer.write(b"\x40\x02" + struct.pack("!H", pid))
        if self.v5:  # skip the properties
            length, shift = 0, 0
            while True:
                byte = body[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            pos += length
        for pattern, into in self.handlers:
            if _matches(pattern, topic):
                into.put_nowait((topic, memoryview(body)[pos:]))  # no copy of a chunk


def _matches(pattern: str, topic: str) -> bool:
    want, got = pattern.split("/"), topic.split("/")
    if len(want) != len(got):
        return False
    return all(w in ("+", g) for w, g in zip(want, got, strict=True))


class LightDevice:
    """One device: its session, its checks, its state folder."""

    def __init__(self, device: str, fleet: str, root: Path, trusted: Any, put: Any) -> None:
        from agent.wire.topics import Topics

        self.device, self.fleet, self.root = device, fleet, root
        self.trusted, self.put = trusted, put
        self.topics = Topics()
        self.active: dict[str, tuple[str, int]] = {}
        self.last_serial: dict[str, int] = {}
        self.held: set[str] = set()  # sha256 of the artifacts in its folder

    def event(self, session: Session, name: str, manifest: Any, **fields: Any) -> None:
        from agent.wire import payloads

        body = payloads.event(self.device, name, model=manifest.name, version=manifest.version,
                              **fields)  # fmt: skip
        session.publish(self.topics.events(self.device), json.dumps(body).encode())
        self.put(("event", self.device, name, time.time()))

    async def run(self, url: str, username: str, password: str, v5: bool,
                  gate: asyncio.Semaphore) -> None:  # fmt: skip
        from agent.wire import payloads

        will = payloads.status(self.device, self.fleet, payloads.OFFLINE, {},
                               reason="connection lost")  # fmt: skip
        async with gate:
            session = await Session.open(url, self.device, username, password, v5,
                                         (self.topics.status(self.device),
                                          json.dumps(will).encode()))  # fmt: skip
        reads = asyncio.create_task(session.reads())
        ping = asyncio.create_task(session.pinger())
        up = False
        try:
            desired: Inbox = asyncio.Queue()
            await session.subscribe(self.topics.fleet_desired_all(self.fleet), desired)
            await session.subscribe(self.topics.device_desired_all(self.device), desired)
            online = payloads.status(self.device, self.fleet, payloads.ONLINE, {})
            session.publish(self.topics.status(self.device), json.dumps(online).encode(), True)
            self.put(("connected", self.device, "", time.time()))
            up = True
            while True:
                got = asyncio.ensure_future(desired.get())
                await asyncio.wait([got, reads], return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    reads.result()  # the connection ended: raise why
                    raise MqttError("the connection ended")
                latest = {got.result()[0]: got.result()[1]}
                while not desired.empty():  # only the newest of each topic counts
                    topic, payload = desired.get_nowait()
                    latest[topic] = payload
                for topic, payload in latest.items():
                    await self.desired(session, topic, payload)
        finally:
            if up:
                self.put(("lost", self.device, "", time.time()))
            reads.cancel()
            ping.cancel()
            session.writer.close()

    async def desired(self, session: Session, topic: str, payload: memoryview) -> None:
        from agent.updates import plan
        from agent.wire import payloads
        from agent.wire.manifest import parse_manifest
        from agent.wire.signing import verify_signature

        if not payload:
            return  # cleared
        source = plan.FLEET if topic.startswith(f"{self.topics.prefix}/fleets/") else plan.DEVICE
        manifest = parse_manifest(bytes(payload))
        verify_signature(manifest, self.trusted)
        name = manifest.name
        decision = plan.decide(manifest, source, self.device, active=self.active.get(name),
                               last_serial=self.last_serial.get(name, -1))  # fmt: skip
        if decision.action == plan.OUTSIDE:
            self.event(session, payloads.NOT_IN_ROLLOUT, manifest, reason=decision.reason)
            return
        if decision.action != plan.INSTALL:
            return
        art = manifest.artifact
        if art.sha256 not in self.held:
            self.event(session, payloads.DOWNLOADING, manifest, chunks=art.chunks, size=art.size)
            if art.urls:
                data, where = await self.from_origin(art.urls[0].replace("{sha256}", art.sha256),
                                                     art), payloads.ORIGIN  # fmt: skip
            else:
                data, where = await self.from_chunks(session, art), payloads.BROKER_CHUNKS
            if len(data) != art.size or hashlib.sha256(data).hexdigest() != art.sha256:
                raise MqttError(f"artifact {art.sha256[:12]}: size or sha256 differs")
            self.root.mkdir(parents=True, exist_ok=True)
            part = self.root / f"{art.sha256}.part"
            part.write_bytes(data)
            os.replace(part, self.root / f"{art.sha256}.onnx")
            self.held.add(art.sha256)
            self.event(session, payloads.VERIFIED, manifest, artifact_source=where)
        self.active[name] = (manifest.version, manifest.serial)
        self.last_serial[name] = manifest.serial
        self.put(("activated", self.device, manifest.version, time.time()))
        self.event(session, payloads.ACTIVATED, manifest)

    async def from_chunks(self, session: Session, art: Any) -> bytes:
        topic = self.topics.artifact_all(art.sha256)
        chunks: Inbox = asyncio.Queue()
        await session.subscribe(topic, chunks)
        have: dict[int, memoryview] = {}
        try:
            while len(have) < art.chunks:
                got, data = await asyncio.wait_for(chunks.get(), CHUNK_WAIT_S)
                index = int(got.rsplit("/", 1)[1])
                if 0 <= index < art.chunks and len(data) == art.chunk_length(index):
                    have[index] = data
        finally:
            await session.unsubscribe(topic)
        return b"".join(have[i] for i in range(art.chunks))

    async def from_origin(self, url: str, art: Any) -> bytes:
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80,
                                                       limit=READ_LIMIT)  # fmt: skip
        try:
            writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         "Range: bytes=0-\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = head[0].split(" ")[1]
            if status not in ("200", "206"):
                raise MqttError(f"origin {url}: HTTP {status}")
            length = next(int(h.split(":", 1)[1]) for h in head
                          if h.lower().startswith("content-length:"))  # fmt: skip
            return await reader.readexactly(length)
        finally:
            writer.close()


def run_light(spec: Any, events: Any, stop: Any) -> None:
    """One worker process of light devices (same events as fleet_devices.run_devices)."""
    from agent.wire.signing import load_trusted_keys

    # Below the servers (nice 0), as run_devices' SCHED_IDLE is, but not below other
    # niced work on the machine: two processes cannot starve the broker as 10000 threads did.
    os.nice(NICE)
    outbox: deque[tuple[str, str, str, float]] = deque()
    trusted = load_trusted_keys([Path(spec.trusted_key)])
    v5 = spec.protocol == "5"

    async def ship(ending: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ending.wait(), 0.25)
            batch = [outbox.popleft() for _ in range(len(outbox))]
            if batch:
                events.put(batch)
            if ending.is_set():
                return

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ending = asyncio.Event()
        threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(ending.set)),
                         daemon=True).start()  # fmt: skip
        shipper = asyncio.create_task(ship(ending))
        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

        async def one(i: int) -> None:
            device = LightDevice(spec.ids[i], "sim", Path(spec.root) / spec.ids[i], trusted,
                                 outbox.append)  # fmt: skip
            user, password_file = spec.accounts[i]
            password = Path(password_file).read_text().strip()
            wait = 1.0
            while True:  # the agent reconnects with jittered backoff: so does a light one
                try:
                    await device.run(spec.urls[i][0], user, password, v5, gate)
                except Exception as e:  # counted in the table's "other events"
                    outbox.append(("event", spec.ids[i], f"light_error:{type(e).__name__}",
                                   time.time()))  # fmt: skip
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))
                wait = min(wait * 2, SUBSCRIBE_BACKOFF_MAX_S)

        tasks = [asyncio.create_task(one(i)) for i in range(len(spec.ids))]
        outbox.append(("__ready__", "", str(len(tasks)), time.time()))
        await ending.wait()
        await shipper
        for t in tasks:
            t.cancel()

    asyncio.run(main())
    events.close()
    events.join_thread()
    os._exit(0)
