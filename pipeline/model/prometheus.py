"""Prometheus text exposition (format 0.0.4): one writer and one parser for every endpoint."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: metric family name -> (type, help text)
Families = Mapping[str, tuple[str, str]]


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_number(v: float) -> str:
    """A sample value as Prometheus writes it (integers without a fraction, ``NaN``, ``+Inf``)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class Exposition:
    """Samples of declared metric families, rendered in the families' declaration order.

    ``families`` maps each family name to its type (``counter``, ``gauge``,
    ``untyped``) and help text; adding a sample of an undeclared family is a bug
    (``KeyError``), so every exported metric is documented where it is declared.
    """

    def __init__(self, families: Families) -> None:
        self._families = families
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def add(self, name: str, value: float | None, **labels: str) -> None:
        """One sample; ``None`` values are skipped (no sample rather than a fake zero)."""
        if name not in self._families:
            raise KeyError(f"metric {name} is not declared")
        if value is None:
            return
        self._samples.setdefault(name, []).append((labels, float(value)))

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text) in self._families.items():
            samples = self._samples.get(name)
            if not samples:
                continue
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                if labels:
                    inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
                    lines.append(f"{name}{{{inner}}} {format_number(value)}")
                else:
                    lines.append(f"{name} {format_number(value)}")
        return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse the samples of a text exposition (enough for tests and tools; no escapes in
    label values beyond ``\\"``, ``\\\\`` and ``\\n``)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        name = head
        if "{" in head:
            name, _, rest = head.partition("{")
            body = rest.rstrip("}")
            for part in _split_labels(body):
                k, _, v = part.partition("=")
                labels[k] = _unescape(v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v)
        out[(name, frozenset(labels.items()))] = float(value)
    return out


def _unescape(v: str) -> str:
    """Undo :func:`_label_value` in one pass (``\\\\n`` is a backslash and an ``n``)."""
    out: list[str] = []
    chars = iter(v)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append("\n" if nxt == "n" else nxt)
        else:
            out.append(ch)
    return "".join(out)


def _split_labels(body: str) -> Iterable[str]:
    part, quoted, escaped = "", False, False
    for ch in body:
        if escaped:
            part += ch
            escaped = False
        elif ch == "\\":
            part += ch
            escaped = True
        elif ch == '"':
            part += ch
            quoted = not quoted
        elif ch == "," and not quoted:
            yield part
            part = ""
        else:
            part += ch
    if part:
        yield part


def samples_as_written(text: str) -> dict[str, float]:
    """Every sample keyed by its series as written (``name{label="v"}``): quick look-ups
    in tests and tools that know the exact series they want."""
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out
