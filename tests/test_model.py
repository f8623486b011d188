"""The shared helpers of pipeline.model: bounded JSON from peers, the loopback check."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import JsonInputError
from pipeline.model.jsonsafe import MAX_DEPTH, loads, nesting_depth
from pipeline.model.net import is_loopback


def test_loads_parses_what_posewire_sends() -> None:
    msg = {"type": "clock", "offset_ns": -(2**62), "rtt_ns": 1500, "ok": True, "n": None}
    assert loads(json.dumps(msg)) == msg
    assert loads(json.dumps(msg).encode()) == msg
    assert loads('{"s": "[[[[{{{{\\"]]]"}') == {"s": '[[[[{{{{"]]]'}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 1000 + "]" * 1000, "nested 1000 levels deep"),
        ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), "levels deep"),
        ('{"offset_ns": 1' + "0" * 400 + "}", "out of range"),
        ('{"offset_ns": ' + str(2**63) + "}", "out of range"),
        ('{"x": 1e999}', "not finite"),
        ('{"x": -Infinity}', "not a number posewire accepts"),
        ("NaN", "not a number posewire accepts"),
        ('{"x": 1', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_loads_refuses_what_would_cost_or_crash_later(text: str | bytes, why: str) -> None:
    with pytest.raises(JsonInputError, match=why):
        loads(text)


def test_depth_ignores_brackets_in_strings_and_escapes() -> None:
    assert nesting_depth('{"a": "[[[[", "b": ["\\"[", [1]]}') == 3
    assert loads('{"a": "' + "[" * 500 + '"}', max_depth=1) == {"a": "[" * 500}


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("fe80::1%eth0", False),
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop
