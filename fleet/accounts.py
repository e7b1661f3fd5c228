"""Broker accounts: the password files and the ACL blocks of every role, written once.

``broker-config/mkcreds.sh`` (one account at a time) and ``edge-fleet enroll`` (many
devices at once) both write accounts through this module, so what a role may do is
defined here and nowhere else (docs/broker.md lists it). The folder is the one
``broker-config/mkconf.sh`` renders: ``acl`` (the header of device patterns, then one
block per account), ``passwd`` (devices: the device listeners) and
``passwd-operators`` (every other role: the operator listeners).

Only the standard library and ``agent.wire.names`` are imported: mkcreds.sh runs this
module with the system ``python3`` from a checkout, no virtualenv needed.

Passwords are hashed by mosquitto's own ``mosquitto_passwd -U`` (one call for a whole
batch, and no password on a command line where ``ps`` would show it), so the hash is
always one the installed broker reads.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.wire.errors import EdgeError, UsageError, run_command
from agent.wire.names import name_problem

DEFAULT_CONF_DIR = Path("/etc/mosquitto/edge")
DEVICES, OPERATORS = "passwd", "passwd-operators"  # the two listeners' password files
ROLES = ("device", "operator", "collector", "viewer")
ALIASES = {"reader": "viewer"}  # the read-only role's name before issue 13
PASSWORD_CHARS = string.ascii_letters + string.digits
PASSWORD_LEN = 24
_PATTERN_PREFIX = re.compile(r"^pattern (?:read)?write (.+)/devices/%u/status$", re.M)


class AccountError(EdgeError):
    """An account cannot be written: a name taken by the other listener, no ACL yet."""


@dataclass(frozen=True)
class Account:
    """One broker account: its name, which password file it lives in, its ACL lines."""

    name: str
    passwd: str  # DEVICES or OPERATORS
    acl: tuple[str, ...]  # the block's lines after ``user NAME``
    role: str = ""

    def block(self) -> str:
        return "\n".join([f"user {self.name}", *self.acl])


def role_account(role: str, name: str, prefix: str, fleet: str | None = None) -> Account:
    """The account of ``role`` named ``name``; ``fleet`` for a device.

    The ACL header's device patterns (``%u``) apply to every account, so each non-device
    role starts with a deny of its own device topics: otherwise a collector named c1
    could publish ``edge/devices/c1/status`` and pass for a device (a deny wins over
    every grant, and mkcreds.sh keeps device names and the others apart).
    """
    role = ALIASES.get(role, role)
    check_name("name", name)
    p = prefix
    own = f"topic deny {p}/devices/{name}/#"
    if role == "device":
        if fleet is None:
            raise UsageError("--fleet: a device needs its fleet")
        check_name("--fleet", fleet)
        # Patterns know %u and %c but not a device's fleet, and a "topic" line outside a
        # user block applies to anonymous clients only: hence a block per device.
        lines = [f"topic read {p}/fleets/{fleet}/models/+/desired", f"topic read {p}/artifacts/#"]
        return Account(name, DEVICES, tuple(lines), role)
    if fleet is not None:
        raise UsageError(f"--fleet: only a device has a fleet, not a {role}")
    if role == "operator":
        # Exactly what edge-fleet's commands use; no results (they may hold inputs) and
        # no acks (a forged ack makes a device delete rows no database holds).
        lines = [
            own,
            *(f"topic readwrite {p}/fleets/+/models/+/{t}" for t in ("desired", "history")),
            f"topic readwrite {p}/fleets/+/models/+/rollout",
            *(f"topic readwrite {p}/devices/+/models/+/{t}" for t in ("desired", "history")),
            f"topic readwrite {p}/artifacts/#",
            f"topic readwrite {p}/devices/+/enrolment",
            # Written only to clear a decommissioned device's retained status (forget).
            f"topic readwrite {p}/devices/+/status",
            f"topic read {p}/devices/+/health",
            f"topic read {p}/devices/+/events",
            f"topic write {p}/devices/+/commands/+",
            f"topic read {p}/devices/+/responses/#",
            # The barrier of retained reads (fleet/retained.py): a message to oneself.
            f"topic readwrite {p}/fleet-tools/#",
        ]
    elif role == "collector":
        lines = [
            own,
            *(f"topic read {p}/devices/+/{kind}" for kind in ("results", "health", "events")),
            f"topic read {p}/devices/+/status",
            f"topic write {p}/devices/+/results/ack",
        ]
    elif role == "viewer":
        lines = [
            own,
            *(f"topic read {p}/devices/+/{kind}" for kind in ("status", "health", "events")),
            f"topic read {p}/devices/+/enrolment",
            *(f"topic read {p}/fleets/+/models/+/{t}" for t in ("desired", "history", "rollout")),
            *(f"topic read {p}/devices/+/models/+/{t}" for t in ("desired", "history")),
            # Its own corner for a retained-read barrier; nothing the fleet reads.
            f"topic readwrite {p}/fleet-tools/{name}/#",
        ]
    else:
        known = ", ".join([*ROLES, *ALIASES])
        raise UsageError(f"{role!r}: expected one of {known}")
    return Account(name, OPERATORS, tuple(lines), role)


def check_name(kind: str, value: str) -> str:
    """Names become topic segments, ACL lines and file names: the wire's name rule."""
    problem = name_problem(kind, value)
    if problem is not None:
        raise UsageError(problem)
    return value


def new_password() -> str:
    return "".join(secrets.choice(PASSWORD_CHARS) for _ in range(PASSWORD_LEN))


# --- the broker's configuration folder ---------------------------------------------


class BrokerConf:
    """The folder mkconf.sh rendered: the ACL and the two password files."""

    def __init__(self, conf_dir: Path | str = DEFAULT_CONF_DIR, prefix: str | None = None):
        self.dir = Path(conf_dir)
        self.acl = self.dir / "acl"
        if not self.acl.is_file():
            raise AccountError(f"{self.acl}: no ACL file (run broker-config/mkconf.sh first)")
        self.prefix = prefix or self._acl_prefix()

    def _acl_prefix(self) -> str:
        # The prefix the ACL was rendered with, from its first pattern line.
        match = _PATTERN_PREFIX.search(self.acl.read_text(encoding="utf-8"))
        return match.group(1) if match else "edge"

    def names(self, passwd: str) -> set[str]:
        """The accounts of one password file."""
        path = self.dir / passwd
        if not path.is_file():
            return set()
        return {line.split(":", 1)[0] for line in path.read_text().splitlines() if ":" in line}

    def listener_of(self, name: str) -> str | None:
        """DEVICES or OPERATORS when ``name`` has an account, else None."""
        for passwd in (DEVICES, OPERATORS):
            if name in self.names(passwd):
                return passwd
        return None

    def conflicts(self, accounts: Iterable[Account]) -> None:
        """Refuse a name that has an account on the other listener: its ACL block is found
        by name, so a device and an operator-listener account may not share one."""
        for account in accounts:
            other = OPERATORS if account.passwd == DEVICES else DEVICES
            if account.name in self.names(other):
                what = "a device account" if other == DEVICES else "an operator-listener account"
                raise AccountError(f"{account.name!r} is {what} already")

    def write(self, accounts: Sequence[Account]) -> dict[str, str]:
        """Create or renew ``accounts``: fresh passwords, ACL blocks replaced.

        Returns name -> password. All or nothing as far as files go: the password files
        are written before the ACL, each by an atomic rename.
        """
        self.conflicts(accounts)
        passwords = {a.name: new_password() for a in accounts}
        try:
            for passwd in (DEVICES, OPERATORS):
                mine = {a.name: passwords[a.name] for a in accounts if a.passwd == passwd}
                if mine:
                    self._set_passwords(passwd, mine)
            self._set_blocks({a.name: a.block() for a in accounts})
        except PermissionError as e:
            raise AccountError(
                f"{e.filename or self.dir}: {e.strerror} (run it as root on the broker host)"
            ) from None
        return passwords

    def remove(self, name: str) -> None:
        """Drop the account from both password files and its block from the ACL."""
        for passwd in (DEVICES, OPERATORS):
            path = self.dir / passwd
            if name in self.names(passwd):
                kept = [ln for ln in path.read_text().splitlines() if ln.split(":", 1)[0] != name]
                _replace(path, "".join(f"{ln}\n" for ln in kept))
        self._set_blocks({name: None})

    def _set_passwords(self, passwd: str, passwords: dict[str, str]) -> None:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise AccountError(
                "mosquitto_passwd not found: install the broker (apt-get install mosquitto), "
                "which ships it"
            )
        path = self.dir / passwd
        with tempfile.TemporaryDirectory(prefix="edge-accounts-") as tmp:
            plain = Path(tmp) / "new"
            with os.fdopen(os.open(plain, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.writelines(f"{name}:{pw}\n" for name, pw in passwords.items())
            done = subprocess.run(
                [tool, "-U", str(plain)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise AccountError(f"mosquitto_passwd -U: {done.stderr.strip() or done.stdout}")
            hashed = plain.read_text().splitlines()
        old = path.read_text().splitlines() if path.is_file() else []
        kept = [ln for ln in old if ln.split(":", 1)[0] not in passwords]
        _replace(path, "".join(f"{ln}\n" for ln in [*kept, *hashed]))

    def _set_blocks(self, blocks: dict[str, str | None]) -> None:
        """Replace (or with None drop) the ``user NAME`` blocks; one blank line apart."""
        text = self.acl.read_text(encoding="utf-8")
        parts = re.split(r"\n\s*\n", text.rstrip("\n"))
        kept = [p for p in parts if _block_user(p) not in blocks]
        added = [b for b in blocks.values() if b is not None]
        _replace(self.acl, "\n\n".join([*kept, *added]) + "\n")


def _block_user(part: str) -> str | None:
    first = part.strip("\n").split("\n", 1)[0]
    return first[len("user ") :] if first.startswith("user ") else None


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by an atomic rename, keeping its mode and owner: the
    broker (user mosquitto, group-readable files) must still read it afterwards."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists():
            st = path.stat()
            os.chmod(tmp, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_password_file(path: Path, password: str) -> Path:
    """``password`` into ``path``, mode 0600 from the start."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(f"{password}\n")
    return path


# --- mkcreds.sh ----------------------------------------------------------------------

USAGE = """\
mkcreds.sh [--conf-dir DIR] [--out DIR] device DEVICE_ID --fleet FLEET
mkcreds.sh [--conf-dir DIR] [--out DIR] operator|collector|viewer NAME
mkcreds.sh [--conf-dir DIR] remove NAME"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mkcreds.sh",
        usage=USAGE,
        description="Create or renew a broker account (docs/broker.md): a fresh password "
        "in the listener's password file, the role's ACL block, and OUT/NAME.password. "
        "Afterwards reload the broker: systemctl reload mosquitto (or kill -HUP its pid).",
    )
    parser.add_argument("--conf-dir", type=Path, default=DEFAULT_CONF_DIR)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--prefix", help="topic prefix (default: the one the ACL names)")
    parser.add_argument("kind", help=f"{', '.join(ROLES)} (reader = viewer), or remove")
    parser.add_argument("name")
    parser.add_argument("--fleet")
    args = parser.parse_args(argv)
    return run_command("mkcreds.sh", lambda: _mkcreds(args), verbose=False)


def _mkcreds(args: argparse.Namespace) -> int:
    check_name("name", args.name)
    conf = BrokerConf(args.conf_dir, args.prefix)
    if args.kind == "remove":
        conf.remove(args.name)
        print(f"removed {args.name}")
        return 0
    account = role_account(args.kind, args.name, conf.prefix, args.fleet)
    password = conf.write([account])[args.name]
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_password_file(args.out / f"{args.name}.password", password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
