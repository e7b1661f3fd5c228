"""``edge-agent``: run the daemon, check its config, install and roll back models, demo.

Exit codes: 0 success, 1 a failure explained in one line on stderr (a traceback only
with ``--verbose``), 2 bad usage. ``install`` and ``rollback`` write the model store
directly, whether or not an agent runs; a running agent notices the changed active
pointer within a second (``agent.updates.watcher.StoreWatcher``) and swaps the model in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import Config, load_config
from agent.status_client import fetch_status, format_status
from agent.wire.errors import ConfigError, EdgeError, run_command
from agent.wire.manifest import Manifest
from agent.wire.package import open_package

PROG = "edge-agent"
DEMO_PACKAGE = Path(__file__).resolve().parent / "demo" / "iris"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="config file (default: $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logs"
    )
    parser = argparse.ArgumentParser(
        prog=PROG, description="Serve ONNX models on this device.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="{run,check-config,status,install,models,rollback,demo}"
    )
    sub.required = True
    sub.add_parser("run", parents=[common], help="run the agent in the foreground")
    sub.add_parser("check-config", parents=[common], help="validate the config, list every problem")
    p = sub.add_parser("status", parents=[common], help="ask the local agent for its status")
    p.add_argument("--json", action="store_true", help="print the raw /status JSON")
    p = sub.add_parser("install", parents=[common], help="install and activate a model package")
    p.add_argument("package", type=Path, help="package folder or .tar")
    p.add_argument("--shadow", action="store_true",
                   help="install it beside the active version: compared on a sample of live "
                        "requests (config [shadow]), never served")  # fmt: skip
    p = sub.add_parser("models", parents=[common], help="list installed model versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("rollback", parents=[common], help="activate the previous version")
    p.add_argument("model", help="model name")
    p.add_argument(
        "--to", metavar="VERSION", help="an installed version (default: the previous one)"
    )
    p = sub.add_parser("demo", parents=[common], help="serve the bundled iris model here")
    p.add_argument("--port", type=int, default=8080, help="first port to try (default 8080)")
    p.add_argument(
        "--host",
        default=os.environ.get("EDGE_AGENT_HTTP_HOST", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1, or $EDGE_AGENT_HTTP_HOST in a container)",
    )
    p.add_argument(
        "--state-dir", type=Path, help="keep state here (default: a temp folder removed at exit)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edge-agent``; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    verbose = bool(getattr(args, "verbose", False))
    log_handler = _setup_logging(verbose, daemon=args.command in {"run", "demo"})
    handler = {
        "run": cmd_run,
        "check-config": cmd_check_config,
        "status": cmd_status,
        "install": cmd_install,
        "models": cmd_models,
        "rollback": cmd_rollback,
        "demo": cmd_demo,
    }[args.command]
    try:
        return run_command(PROG, lambda: handler(args), verbose=verbose)
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)


def _setup_logging(verbose: bool, *, daemon: bool) -> logging.Handler | None:
    """Daemons log INFO to stderr for journald; one-shot commands only print their result.

    One-shot commands get a temporary handler (returned, removed after the command) so
    that calling ``main`` in-process leaves the caller's logging as it was.
    """
    if daemon:
        # Under journald: <N> priority prefixes and no timestamps (agent.sdnotify).
        from agent.sdnotify import log_formatter

        daemon_handler = logging.StreamHandler(sys.stderr)
        daemon_handler.setFormatter(log_formatter(sys.stderr))
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO, handlers=[daemon_handler], force=True
        )
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # Refusals are already the command's one-line error: logs only with --verbose.
    handler.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    root = logging.getLogger()
    root.addHandler(handler)
    if verbose:
        root.setLevel(logging.DEBUG)
    return handler


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


# --- run / check-config -------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from agent.supervisor import Supervisor

    Supervisor(_config(args)).run()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.wire.signing import load_trusted_keys

    cfg = _config(args)
    from agent.secrets import resolve_secret_path

    problems = []
    for i, key in enumerate(cfg.models.trusted_keys):
        try:
            load_trusted_keys([resolve_secret_path(key)])
        except EdgeError as e:
            problems.append(f"models.trusted_keys[{i}]: {e}")
    if problems:
        raise ConfigError(problems)
    print(f"config OK ({cfg.source})")
    print(f"  device {cfg.device.id}, fleet {cfg.device.fleet}")
    if cfg.device.tags:
        print("  tags   " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.device.tags.items())))
    print(f"  http   {cfg.http.host}:{cfg.http.port}" + (" (token)" if cfg.http.token_file else ""))
    urls = cfg.mqtt.broker_urls
    broker = ", ".join(urls) + f" (protocol {cfg.mqtt.protocol})" if urls else ""
    print(f"  mqtt   {broker or 'none (offline: serves and buffers)'}")
    print(f"  state  {cfg.state_path.resolve()}")
    return 0


# --- status -------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    status = fetch_status(_config(args))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


# --- install / models / rollback ----------------------------------------------------


def _local_installer(cfg: Config) -> Any:
    from agent.models.registry import Registry
    from agent.models.store import ModelStore
    from agent.updates.installer import Installer

    store = ModelStore(cfg.models_path, keep_versions=cfg.models.keep_versions)
    return Installer(cfg, store, Registry(default=cfg.models.default or None))


def cmd_install(args: argparse.Namespace) -> int:
    cfg = _config(args)
    installer = _local_installer(cfg)
    with tempfile.TemporaryDirectory(prefix="edge-agent-install-") as scratch:
        package = open_package(args.package, Path(scratch))
        source = f"edge-agent install {args.package}"
        if args.shadow:
            manifest = installer.install_shadow(package, source=source)
        else:
            manifest = installer.install(package, source=source)
    _give_to_state_owner(cfg)
    if args.shadow:
        print(f"installed {manifest.name} {manifest.version} (serial {manifest.serial}) in "
              "shadow: compared beside the active version, not served")  # fmt: skip
        return 0
    print(f"installed {manifest.name} {manifest.version} (serial {manifest.serial}): active")
    print(_running_agent_note(cfg, manifest.name, manifest.version))
    return 0


def _give_to_state_owner(cfg: Config) -> None:
    """After ``sudo edge-agent install``: files root wrote go to the state folder's owner.

    The service runs as its own user (systemd ``DynamicUser=``); a root-owned model
    folder would stop it from activating or pruning versions there later.
    """
    if os.geteuid() != 0 or not cfg.models_path.is_dir():
        return
    owner = cfg.state_path.stat()
    if owner.st_uid == 0:
        return
    for path in [cfg.models_path, *cfg.models_path.rglob("*")]:
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
            os.lchown(path, owner.st_uid, owner.st_gid)


def _running_agent_note(cfg: Config, name: str, version: str, wait_s: float = 10.0) -> str:
    """Tell whether a running agent has picked the version up (it polls the store)."""
    try:
        fetch_status(cfg, timeout=1.0)
    except EdgeError:
        return "no agent is running here; it will serve this version when started"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            model = fetch_status(cfg, timeout=2.0).get("models", {}).get(name) or {}
        except EdgeError:
            break
        if model.get("version") == version:
            return f"the running agent now serves {name} {version}"
        time.sleep(0.2)
    return f"the running agent has not switched to {name} {version} yet; see `edge-agent status`"


def cmd_models(args: argparse.Namespace) -> int:
    from agent.models.store import ModelStore

    cfg = _config(args)
    store = ModelStore(cfg.models_path, keep_versions=cfg.models.keep_versions)
    listing: dict[str, dict[str, Any]] = {}
    for name in store.names():
        pointer = store.active(name)
        listing[name] = {
            "active": pointer.version if pointer else None,
            "previous": pointer.previous if pointer else None,
            "serial": pointer.serial if pointer else None,
            "activated_at": pointer.activated_at if pointer else None,
            "versions": store.versions(name),
        }
    if args.json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    if not listing:
        print(f"no models installed in {store.root}")
        return 0
    for name, info in listing.items():
        print(f"{name} (serial {info['serial']}, activated {info['activated_at']})")
        for version in reversed(info["versions"]):
            mark = "active" if version == info["active"] else ""
            mark = "previous" if version == info["previous"] else mark
            print(f"  {'*' if mark == 'active' else ' '} {version:<12} {mark}".rstrip())
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg = _config(args)
    installer = _local_installer(cfg)
    before = installer.store.active(args.model)
    manifest = installer.rollback(args.model, reason="edge-agent rollback", to=args.to)
    _give_to_state_owner(cfg)
    print(f"rolled back {args.model}: {before.version if before else '-'} -> {manifest.version}")
    print(_running_agent_note(cfg, manifest.name, manifest.version))
    return 0


# --- demo ---------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the bundled iris model on 127.0.0.1 and print a curl line that works."""
    from agent.supervisor import Supervisor

    if not (DEMO_PACKAGE / "manifest.json").is_file():
        raise EdgeError(f"the bundled demo package is missing: {DEMO_PACKAGE}")
    temp = None
    if args.state_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="edge-agent-demo-")
        state = Path(temp.name)
    else:
        state = args.state_dir
    try:
        cfg = Config(state_dir=str(state))  # the demo ignores /etc: it must just work
        cfg.source = "edge-agent demo"
        cfg.http.host = args.host
        cfg.http.port = _free_port(cfg.http.host, args.port)
        installer = _local_installer(cfg)
        manifest = installer.install(DEMO_PACKAGE, source="bundled demo")
        supervisor = Supervisor(cfg)

        def banner() -> None:
            host, port = supervisor.address()
            print(_demo_banner(host, port, manifest, state), flush=True)

        supervisor.run(on_started=banner)
    finally:
        if temp is not None:
            temp.cleanup()
    return 0


def _free_port(host: str, first: int, tries: int = 100) -> int:
    import socket

    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise EdgeError(f"demo: no free port in {first}..{first + tries - 1} on {host}")


def _demo_banner(host: str, port: int, manifest: Manifest, state: Path) -> str:
    rows = manifest.parity.get("inputs", {}).get(manifest.inputs[0].name) or [[0.0]]
    # Parity rows are float32 values; a person reads 5.1, not 5.099999904632568.
    body = json.dumps({"features": [[float(f"{v:.6g}") for v in row] for row in rows[:2]]})
    # A wildcard address is not one to curl: the machine's own loopback is.
    base = f"http://{'127.0.0.1' if host in {'0.0.0.0', '::'} else host}:{port}"
    return (
        f"edge-agent demo: serving {manifest.name} {manifest.version} at {base} (state in {state})\n"
        f"try:\n"
        f"  curl -s {base}/predict -H 'Content-Type: application/json' -d '{body}'\n"
        f"Ctrl-C stops it."
    )


if __name__ == "__main__":
    sys.exit(main())
