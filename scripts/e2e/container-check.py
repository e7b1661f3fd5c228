#!/usr/bin/env python3
"""HTTP checks of the container e2e, from the host, with the standard library only.

    container-check.py live URL [--timeout S]            wait for /v2/health/live
    container-check.py predict URL MANIFEST [--timeout S] /predict the package's parity
                                                          rows, compare with its labels
    container-check.py status URL --device ID             /status names this device
    container-check.py broker URL [--timeout S]           /status says the broker is connected

Timeouts are generous: under qemu the agent imports onnxruntime about 70x slower than
on a Pi. Each check prints one line; a failure exits 1 with what was expected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# One unambiguous flower of each species from Fisher's iris data (rows 1, 64 and 146).
IRIS_TEXTBOOK = {
    (5.1, 3.5, 1.4, 0.2): "setosa",
    (6.1, 2.9, 4.7, 1.4): "versicolor",
    (6.7, 3.0, 5.2, 2.3): "virginica",
}


def request(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def until(timeout: float, what: str, attempt: Any) -> Any:
    """Call ``attempt`` until it returns something truthy; fail with the last answer."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            ok, last = attempt()
            if ok:
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1)
    sys.exit(f"FAIL {what}: not within {timeout:.0f}s, last answer: {last}")


def check_live(args: argparse.Namespace) -> None:
    started = time.monotonic()

    def attempt() -> tuple[bool, Any]:
        status, body = request(f"{args.url}/v2/health/live")
        return status == 200, (status, body)

    until(args.timeout, "GET /v2/health/live", attempt)
    print(f"ok   /v2/health/live answered 200 after {time.monotonic() - started:.1f}s")


def check_predict(args: argparse.Namespace) -> None:
    manifest = json.loads(Path(args.manifest).read_text())
    parity = manifest["parity"]
    rows = list(next(iter(parity["inputs"].values())))
    expected = list(parity["expected"].get("label") or next(iter(parity["expected"].values())))
    if manifest.get("classes") == list(IRIS_TEXTBOOK.values()):
        # The demo's parity rows may all be one class; a model stuck on one label must fail.
        rows += [list(r) for r in IRIS_TEXTBOOK]
        expected += list(IRIS_TEXTBOOK.values())
    started = time.monotonic()

    def attempt() -> tuple[bool, Any]:
        # 503 until the agent has swapped the installed model in.
        status, body = request(f"{args.url}/predict", {"features": rows})
        return status == 200, (status, body)

    _, body = until(args.timeout, "POST /predict", attempt)
    got = body.get("prediction") if isinstance(body, dict) else None
    if got != expected:
        sys.exit(f"FAIL POST /predict: prediction {got}, expected {expected}")
    print(
        f"ok   /predict: {len(rows)} rows of {manifest['name']} {manifest['version']} "
        f"answered as expected: {sorted(set(got))} ({time.monotonic() - started:.1f}s)"
    )


def check_status(args: argparse.Namespace) -> None:
    status, body = request(f"{args.url}/status")
    device = body.get("device", body.get("device_id")) if isinstance(body, dict) else None
    if isinstance(device, dict):
        device = device.get("id")
    if status != 200 or device != args.device:
        sys.exit(f"FAIL GET /status: device {device!r} (HTTP {status}), expected {args.device!r}")
    print(f"ok   /status: device id {device} (from the environment override)")


def check_broker(args: argparse.Namespace) -> None:
    def attempt() -> tuple[bool, Any]:
        status, body = request(f"{args.url}/status")
        broker = body.get("broker") if isinstance(body, dict) else None
        return isinstance(broker, dict) and broker.get("connected") is True, (status, broker)

    broker = until(args.timeout, "GET /status broker.connected", attempt)[1]
    print(f"ok   /status: connected to {broker.get('url')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("live")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(run=check_live)
    p = sub.add_parser("predict")
    p.add_argument("url")
    p.add_argument("manifest")
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(run=check_predict)
    p = sub.add_parser("status")
    p.add_argument("url")
    p.add_argument("--device", required=True)
    p.set_defaults(run=check_status)
    p = sub.add_parser("broker")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(run=check_broker)
    args = parser.parse_args()
    args.url = args.url.rstrip("/")
    args.run(args)


if __name__ == "__main__":
    main()
