"""Parsing JSON from untrusted peers without letting them choose the cost.

``json.loads`` recurses once per nesting level: a few kilobytes of ``[[[[...``
raise ``RecursionError`` deep inside the parser (or exhaust the C stack in
some builds), and huge integer literals (``1e400`` is a float, but ``10**400``
written out is an int) make later arithmetic raise ``OverflowError``. Every
parser of bytes that come from a network peer (the member protocol, the REST
API, the monitor's control endpoint, the clients) goes through :func:`loads`,
which checks the nesting depth in one linear scan *before* parsing, and
refuses non-finite numbers and integers beyond 64 bits.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pipeline.errors import JsonInputError

#: deepest nesting any posewire message needs is 3; leave room for extensions
MAX_DEPTH = 16
#: integers beyond this magnitude are refused (they would only overflow later)
MAX_INT = 2**63


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of ``text``, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _int(literal: str) -> int:
    # a digit run is bounded before int() runs (CPython also caps int parsing at
    # 4300 digits, which is still far beyond any value posewire accepts)
    if len(literal.lstrip("-")) > 19:
        raise JsonInputError(f"integer {literal[:24]}... is out of range")
    value = int(literal)
    if abs(value) >= MAX_INT:
        raise JsonInputError(f"integer {value} is out of range")
    return value


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise JsonInputError(f"number {literal[:24]} is not finite")
    return value


def _constant(name: str) -> float:
    raise JsonInputError(f"{name} is not a number posewire accepts")


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON from a peer; :class:`JsonInputError` names what is wrong.

    Refused: invalid JSON, nesting deeper than ``max_depth``, ``NaN`` /
    ``Infinity``, floats that overflow to infinity, integers of more than 19
    digits or beyond +-2**63.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonInputError(f"not UTF-8: {exc}") from exc
    # the character scan costs ~0.1 us a character: skip it when there are too few
    # brackets to nest past the limit (two C-speed counts)
    depth = 0 if text.count("[") + text.count("{") <= max_depth else nesting_depth(text)
    if depth > max_depth:
        raise JsonInputError(f"nested {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except ValueError as exc:
        raise JsonInputError(f"not JSON: {exc}") from exc
