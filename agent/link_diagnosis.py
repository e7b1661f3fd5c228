"""Why a broker connection failed, in words that name the configuration key to fix.

A connection that cannot be made is logged once per cause, not on every retry: the
cause (the TLS error such as "certificate verify failed", the refused login, the
unreachable broker) and the key to fix (``mqtt.ca``, ``mqtt.cert``/``mqtt.key``,
``mqtt.username``/``mqtt.password_file``, ``mqtt.url``); ``broker.last_error`` in
/status keeps it until the next connect. paho hands a failed TLS handshake to
``on_connect_fail`` from inside its ``except OSError``, so ``sys.exc_info()`` there is
the ssl error; a TLS alert after the handshake (TLS 1.3: the broker refusing our client
certificate) only reaches ``on_log`` ("failed to receive on socket: ...") before
``on_disconnect``.
"""

from __future__ import annotations

import logging
import re
import ssl

from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig

# X509_V_ERR_HOSTNAME_MISMATCH: the certificate verified, but not for the host in the URL.
HOSTNAME_MISMATCH = 62
# CONNACK reasons that mean the login: MQTT 5 134/135, MQTT 3.1.1 4/5.
LOGIN_REFUSED = {134, 135, 4, 5}
# CONNACK 0x84; paho reports a 3.1.1 broker's return code 1 to a v5 CONNECT as this too.
UNSUPPORTED_VERSION = 132
# paho's on_log text for a socket error; a TLS alert from the broker arrives this way.
SOCKET_ERROR_LOG = "failed to receive on socket: "

log = logging.getLogger("agent.paho_link")


class Trouble:
    """The state of a failing connection: each cause logged once, the last one kept.

    Fed by the MQTT client's callbacks (on paho's thread); ``last_error`` is what
    /status shows. A repeat of the same cause is counted, not logged again.
    """

    def __init__(
        self, m: MqttConfig, host: str, port: int, *, tls: bool, url: str = "", key: str = ""
    ) -> None:
        self.m, self.host, self.port, self.tls = m, host, port, tls
        # The URL and the key that names it (mqtt.url, or mqtt.urls[i] of several).
        self.url, self.key = url or m.url, key or "mqtt.url"
        self.last_error: str | None = None
        self.failed_attempts = 0  # connection attempts failed since the last connect
        self._logged: str | None = None  # a repeat of this cause is not logged again
        self._socket_error: str | None = None  # socket error seen during this attempt
        self._connack = False  # this attempt got a CONNACK (success or refusal)

    def attempt(self) -> None:
        self._socket_error = None
        self._connack = False

    def socket_log(self, line: str) -> None:
        if line.startswith(SOCKET_ERROR_LOG):
            self._socket_error = clean(line[len(SOCKET_ERROR_LOG) :])

    def connect_failed(self, error: BaseException | None) -> None:
        """The TCP connect or the TLS handshake failed (paho's on_connect_fail)."""
        if isinstance(error, ssl.SSLError):
            self.failed(*tls(self, error))
        elif self.tls and isinstance(error, ConnectionResetError):
            # mosquitto resets a TLS handshake sent to a listener without TLS.
            self.failed(*tls(self, clean(str(error))))
        elif error is not None:
            self.failed(*unreachable(self, clean(str(error))))
        else:
            self.failed(*unreachable(self, "connection failed"))

    def answered(self) -> None:
        """A CONNACK came (one the link handles itself, such as "not MQTT 5" under auto)."""
        self._connack = True

    def refused(self, rc: ReasonCode) -> None:
        self._connack = True
        self.failed(*refusal(self.m, rc))

    def connected(self) -> None:
        self._connack = True
        if self.last_error is not None:
            log.info("mqtt: %s:%d reachable again after %d failed attempt(s)",
                     self.host, self.port, self.failed_attempts)  # fmt: skip
        self.last_error = self._logged = None
        self.failed_attempts = 0

    def lost(self, reason: str) -> None:
        self.last_error = f"connection lost: {self._socket_error or reason}"

    def closed_before_connack(self, reason: str) -> None:
        """Closed before any CONNACK: a TLS alert after the handshake (the broker refusing
        our client certificate), or the broker hanging up."""
        if self._connack:
            return
        error = self._socket_error
        if error is None:
            self.failed(f"the broker closed the connection before answering ({reason})",
                        "see the broker's log")  # fmt: skip
        elif "SSL" in error or "TLS" in error.upper():
            self.failed(*tls(self, error))
        else:
            self.failed(*unreachable(self, error))

    def failed(self, cause: str, fix: str, level: int = logging.ERROR) -> None:
        """Record a failed attempt; log it only when the cause differs from the last one."""
        self.failed_attempts += 1
        self.last_error = f"{cause}; {fix}"
        if cause == self._logged:
            return
        self._logged = cause
        log.log(level, "mqtt: cannot connect to %s:%d: %s; %s (retrying; logged again when"
                " the cause changes)", self.host, self.port, cause, fix)  # fmt: skip


def tls(t: Trouble, error: ssl.SSLError | str) -> tuple[str, str]:
    """The cause of a TLS failure and the config key that fixes it."""
    m = t.m
    if isinstance(error, ssl.SSLCertVerificationError):
        cause = f"TLS: certificate verify failed: {str(error.verify_message).rstrip('.')}"
        if error.verify_code == HOSTNAME_MISMATCH:
            return cause, (
                f"the host in {t.key} ({t.url!r}) must be a name the broker's"
                " certificate is issued for"
            )
        ca = f"now {m.ca!r}" if m.ca else "now empty: the system's trust store"
        return cause, f"mqtt.ca must be the CA that signed the broker's certificate ({ca})"
    text = clean(str(error)) if isinstance(error, ssl.SSLError) else error
    if "ALERT" in text.upper() and re.search(r"CERTIFICATE|UNKNOWN_CA", text.upper()):
        have = f"now {m.cert!r} and {m.key!r}" if m.cert else "none is set"
        return f"TLS: the broker refused the client certificate: {text}", (
            f"mqtt.cert / mqtt.key must be a certificate the broker's CA signed ({have})"
        )
    return f"TLS: handshake failed: {text}", (
        f"{t.key} ({t.url!r}) must name the broker's TLS port, mqtt.ca its CA"
    )


def unreachable(t: Trouble, text: str) -> tuple[str, str, int]:
    return (
        f"broker not reachable: {text}",
        f"is it running, and is {t.key} ({t.url!r}) right?",
        logging.WARNING,
    )


def refusal(m: MqttConfig, rc: ReasonCode) -> tuple[str, str]:
    code = int(rc.value)
    if unsupported(rc):
        return f"the broker does not speak MQTT 5: {rc.getName()} (reason {code})", (
            'set mqtt.protocol = "3.1.1" (or "auto", which finds out by itself)'
        )
    if code not in LOGIN_REFUSED:
        return f"the broker refused the connection: {rc.getName()} (reason {code})", (
            "see the broker's log"
        )
    cause = f"the broker refused the login: {rc.getName()} (reason {code})"
    if not m.username:
        return cause, (
            "mqtt.username is empty: set mqtt.username and mqtt.password_file, or a"
            " client certificate in mqtt.cert / mqtt.key"
        )
    password = f"{m.password_file!r}" if m.password_file else "not set"
    return cause, (
        f"check user {m.username!r} (mqtt.username) and its password in"
        f" mqtt.password_file ({password})"
    )


def unsupported(rc: ReasonCode) -> bool:
    """The CONNACK says the broker does not speak the MQTT version we sent."""
    return int(rc.value) == UNSUPPORTED_VERSION


def clean(text: str) -> str:
    """An ssl error's text without OpenSSL's source location."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text).strip()
