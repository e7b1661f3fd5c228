"""Body codecs shared by every route: JSON parsing with errors that name the place, and
gzip/deflate request and response bodies bounded against decompression bombs."""

from __future__ import annotations

import json
import zlib
from typing import Any

from agent.wire.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # deflate = zlib stream (RFC 9110)
_decode = json.JSONDecoder().decode  # what json.loads uses when given no options


class HugeInteger:
    """A JSON integer longer than Python converts (``sys.get_int_max_str_digits()``).

    It stands where the number was, so the validator that reads that place refuses it
    and names the field ("features[0][3]: expected a number, got an integer of 5000
    digits"), instead of the whole request failing inside the parser with a 500.
    """

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _int_or_huge(text: str) -> int | HugeInteger:
    try:
        return int(text)
    except ValueError:
        return HugeInteger(text)


_decode_huge = json.JSONDecoder(parse_int=_int_or_huge).decode


def parse_json(data: bytes | memoryview, what: str = "body") -> Any:
    """JSON from a request body; a syntax error names the line, column and offset."""
    try:
        try:
            if type(data) is bytes and data[:1] == b"{" and data[1:2] != b"\x00":
                # What json.loads does for a body that is plainly UTF-8 (no BOM, not
                # UTF-16/32), without its encoding detection: a few us per request.
                return _decode(data.decode("utf-8", "surrogatepass"))
            return json.loads(bytes(data))
        except json.JSONDecodeError:
            raise
        except ValueError:
            # Only int() raises a plain ValueError in the parser: a number past the
            # integer digit limit. Parse again (rare) with such numbers kept as markers.
            raw = bytes(data)
            return _decode_huge(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"{what}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise BadRequest(f"{what}: JSON nested too deeply") from None


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo a Content-Encoding, stopping at ``limit`` bytes so a bomb cannot fill memory."""
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(
            f"Content-Encoding: {encoding!r} is not supported (expected gzip, deflate or identity)"
        )
    for bits in (wbits, -15) if encoding == "deflate" else (wbits,):
        d = zlib.decompressobj(bits)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error as e:
            if bits == wbits and encoding == "deflate":
                continue  # some clients send raw deflate without the zlib header
            raise BadRequest(f"body: not valid {encoding} data ({e})") from None
        if len(out) > limit or d.unconsumed_tail:
            raise PayloadTooLarge(len(out), limit)
        if not d.eof:
            raise BadRequest(f"body: {encoding} data is truncated")
        return out
    raise BadRequest(f"body: not valid {encoding} data")


def choose_encoding(accept: str | None) -> str | None:
    """gzip or deflate if the client's Accept-Encoding allows it (q > 0), else None."""
    if not accept:
        return None
    allowed: dict[str, float] = {}
    for part in accept.split(","):
        token, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip().replace(" ", "")
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        allowed[token.strip().lower()] = q
    for enc in ("gzip", "deflate"):
        if allowed.get(enc, allowed.get("*", 0.0)) > 0:
            return enc
    return None
