"""The one rule for stream ids, wherever an id comes from (``--name``, a source's derived name, a site config's
``id``): letters, digits, ``_`` and ``-``, at most :data:`MAX_LENGTH` characters.

A stream id becomes a part of ZeroMQ topics (``streamtsm.pred.<id>``) and subscribers filter topics by prefix, so
an id holding a dot could reach another stream's subscribers (``--name "cam0.x"`` under ``streamtsm.pred.cam0``),
and a newline or other control character would reach a terminal. Ids a user writes are checked
(:func:`check_stream_id`); ids derived from a source are made to fit (:func:`sanitize_stream_id`).

This module imports nothing of the package but its errors, so any part of it can use it.
"""

from __future__ import annotations

import re

from .errors import ConfigError

MAX_LENGTH = 64  # long enough for any camera's name; short enough for a topic and a terminal line
PATTERN = re.compile(r"[A-Za-z0-9_-]+")
RULE = f"letters, digits, '_' and '-' (1 to {MAX_LENGTH} characters; it becomes a topic part)"
_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]+")


def is_stream_id(value: object) -> bool:
    """Whether ``value`` is a string that follows the rule."""
    return isinstance(value, str) and len(value) <= MAX_LENGTH and PATTERN.fullmatch(value) is not None


def check_stream_id(value: object, where: str = "stream id") -> str:
    """``value`` when it follows the rule, else a ConfigError naming ``where`` (e.g. ``"--name"``)."""
    if not is_stream_id(value):
        raise ConfigError(f"{where} {value!r} may only hold {RULE}")
    return value


def sanitize_stream_id(raw: str, fallback: str = "stream") -> str:
    """An id under the rule made from any text: each run of other characters becomes one ``-``, ends trimmed of
    ``-`` and ``_``, cut to :data:`MAX_LENGTH`; ``fallback`` when nothing is left."""
    name = _OUTSIDE.sub("-", raw)
    name = re.sub(r"-{2,}", "-", name).strip("-_")[:MAX_LENGTH].strip("-_")
    return name or fallback


def unique_stream_id(name: str, taken: set[str] | frozenset[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first not in ``taken`` (kept under :data:`MAX_LENGTH`)."""
    if name not in taken:
        return name
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = name[:MAX_LENGTH - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1
