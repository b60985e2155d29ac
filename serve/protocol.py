"""What a client sends, checked before anything else sees it: JSON text messages and request fields.

Every refusal is a :class:`RequestError` (answered 400, or WebSocket close 1008) with one line that names the
field, so hostile input (NaN or Infinity, deep nesting, a 5000-digit number, ``true`` for a count, ``1.5``
for a seed) never reaches the engine or turns into a traceback.
"""

from __future__ import annotations

import json
import re

from .uploads import RequestError

MAX_JSON_CHARS = 16 << 10  # a start message is a few hundred characters
MAX_INT_DIGITS = 25  # more than any field needs (a seed is at most 20 digits)
_INT = re.compile(r"\+?[0-9]{1,%d}" % MAX_INT_DIGITS)


def shown(value) -> str:
    """``value`` for a message: its repr, cut to 40 characters (never the whole of a huge value)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_constant(name: str):
    raise RequestError(f"JSON must not contain {name} (not a JSON number)")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"JSON number of {len(text)} digits; numbers here have at most {MAX_INT_DIGITS}")
    return int(text)


def parse_json(text: str | None):
    """A client's JSON text message, strictly: at most ``MAX_JSON_CHARS``, no NaN/Infinity, no huge integers."""
    text = text or ""
    if len(text) > MAX_JSON_CHARS:
        raise RequestError(f"JSON message of {len(text)} characters; this server takes at most {MAX_JSON_CHARS}")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("JSON message nested too deeply") from None
    except ValueError:
        return None  # not JSON: the caller says what it expected


def as_int(name: str, value, lo: int, hi: int) -> int | None:
    """A whole number in ``lo..hi`` from a JSON integer or a form field's digits; None when not given."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer in {lo}..{hi}, got {shown(value)}")
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be in {lo}..{hi}, got {shown(value)}")
    return value


def as_str(name: str, value, choices: tuple[str, ...] | None = None) -> str | None:
    """A string field (one of ``choices`` when given); None when not given."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise RequestError(f"{name} must be a string, got {shown(value)}")
    if choices is not None and value not in choices:
        raise RequestError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def as_bool(name: str, value) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {shown(value)}")
    return value


def check_fields(kind: str, data: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise RequestError(f"unknown {kind} field {shown(unknown[0])}; known: {', '.join(known)}")
