"""The one error family of the project.

Every error carries its outward meaning: the HTTP status an API caller sees and the
exit code a command returns. Transports turn them into ``{"error": ...}`` or a
one-line message on stderr; nothing below them formats errors for a user.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable


class EdgeError(Exception):
    """Base of every error the project raises on purpose."""

    status: int = 500
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- caller's mistakes (HTTP 4xx) -------------------------------------------------


class BadRequest(EdgeError):
    """The request body or parameters are wrong; the message names the field."""

    status = 400


class Unauthorized(EdgeError):
    status = 401


class ModelNotFound(EdgeError):
    status = 404

    def __init__(self, name: str, version: str | None = None, *, why: str | None = None) -> None:
        what = f"model {name!r}" if version is None else f"model {name!r} version {version!r}"
        super().__init__(f"{what} is not installed" + (f" ({why})" if why else ""))
        self.name = name
        self.version = version


class PayloadTooLarge(EdgeError):
    status = 413

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"body: {size} bytes is over the limit of {limit} bytes")


class UnsupportedMediaType(EdgeError):
    status = 415


class ModelFailed(EdgeError):
    """The model itself failed on a request that fits its manifest (a NaN output)."""

    status = 500


class NotReady(EdgeError):
    """No model is ready to answer yet."""

    status = 503


# --- configuration ----------------------------------------------------------------


class ConfigError(EdgeError):
    """One or more configuration keys are wrong; every problem is listed."""

    exit_code = 1

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems) if problems else "invalid configuration")


# --- model packages ---------------------------------------------------------------


class PackageError(EdgeError):
    """A model package (or a delivery of one) cannot be trusted or used."""

    status = 422


class ManifestInvalid(PackageError):
    pass


class ChecksumMismatch(PackageError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: sha256 is {actual}, the manifest says {expected}")


class SizeMismatch(PackageError):
    def __init__(self, what: str, expected: int, actual: int) -> None:
        super().__init__(f"{what}: {actual} bytes, the manifest says {expected}")


class SignatureInvalid(PackageError):
    pass


class SignatureMissing(PackageError):
    pass


class ReplayedSerial(PackageError):
    """A manifest whose serial is not above the last one the device accepted for the name.

    ``fix`` says what to do about it where it happened (a delivery or a local install).
    """

    def __init__(self, name: str, serial: int, last: int, *, fix: str = "") -> None:
        super().__init__(
            f"manifest serial {serial} for {name!r} is not above the last accepted serial {last}"
            + (f"; {fix}" if fix else "")
        )
        self.name, self.serial, self.last = name, serial, last


class ParityFailed(PackageError):
    pass


class ModelLoadFailed(PackageError):
    pass


class SchemaUnsupported(PackageError):
    pass


class KeyFileError(EdgeError):
    """A key file is missing, unreadable or not an ed25519 key."""


class StorageFull(EdgeError):
    """The state folder has no room for what we must write."""

    status = 507


class ConversionError(EdgeError):
    """The converter cannot turn this estimator into a package."""


class UsageError(EdgeError):
    """The command line is wrong in a way argparse cannot see (exit 2, like argparse)."""

    exit_code = 2


class BrokerUnavailable(EdgeError):
    """The MQTT broker cannot be reached, or refuses the connection or the credentials."""


# --- the command-line edge --------------------------------------------------------


def run_command(prog: str, command: Callable[[], int], *, verbose: bool) -> int:
    """Run one CLI command and turn what it raises into a one-line message and exit code.

    The one place the three commands (edge-model, edge-agent, edge-fleet) format errors:
    an ``EdgeError`` prints its message (a ``ConfigError`` every problem, one per line);
    anything else is a bug, reported in one line, with the traceback only on ``--verbose``.
    """
    try:
        code = int(command())
        sys.stdout.flush()  # a closed pipe shows here, not at exit with a traceback
        return code
    except BrokenPipeError:
        # `edge-model inspect --json pkg | head`: the reader went away, which is routine.
        # Point stdout at /dev/null so the interpreter's own flush at exit stays quiet,
        # and exit as a command killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except ConfigError as e:
        if verbose:
            traceback.print_exc()
        for problem in e.problems or [e.message]:
            print(f"{prog}: config: {problem}", file=sys.stderr)
        return e.exit_code
    except EdgeError as e:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            traceback.print_exc()
        print(
            f"{prog}: internal error: {type(e).__name__}: {e} (--verbose shows the traceback)",
            file=sys.stderr,
        )
        return 1
