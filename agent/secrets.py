"""Secrets from files: a relative name is looked up in systemd's $CREDENTIALS_DIRECTORY.

Secrets are never inline in the configuration: keys ending in ``_file`` and the TLS
files name a file. Under systemd the unit loads /etc/edge-agent/credentials as the
credential ``edge``, so the same relative name works there and outside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CREDENTIAL_ID = "edge"  # LoadCredential=edge:/etc/edge-agent/credentials in the unit


def missing_file(key: str, value: str, env: Mapping[str, str] | None) -> str:
    """The problem for a file found nowhere, saying where it was looked for."""
    env = os.environ if env is None else env
    problem = f"{key}: {value!r} does not exist or is not a file"
    p = Path(value)
    if p.is_absolute():
        return problem
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        where = (
            f"looked in $CREDENTIALS_DIRECTORY {creds} as {str(p)!r} and "
            f"{f'{CREDENTIAL_ID}_{p}'!r}, then in {Path.cwd()}"
        )
    else:
        where = (
            f"looked in {Path.cwd()}; $CREDENTIALS_DIRECTORY is not set "
            "(systemd sets it for the unit's LoadCredential=)"
        )
    return f"{problem} ({where})"


def resolve_secret_path(value: str, env: Mapping[str, str] | None = None) -> Path:
    """A relative secret (or TLS file) path is looked up in $CREDENTIALS_DIRECTORY first.

    The unit loads the whole /etc/edge-agent/credentials folder as credential ``edge``,
    which systemd names ``edge_<file>``: both spellings are accepted, so the same
    ``password_file = "mqtt.password"`` works under systemd and outside it.
    """
    env = os.environ if env is None else env
    p = Path(value)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if not p.is_absolute() and creds:
        for candidate in (Path(creds) / p, Path(creds) / f"{CREDENTIAL_ID}_{p}"):
            if candidate.exists():
                return candidate
    return p


def read_secret(value: str) -> str:
    """The content of a secret file, without the trailing newline."""
    return resolve_secret_path(value).read_text().rstrip("\r\n")
