"""Parsers and formatters for the config's units: durations ("500ms") and sizes ("2GiB")."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``"500ms"``, ``"30s"``, ``"10m"``, ``"1h"``, ``"1d"`` or a bare number of s.

    Compound forms (``"1m30s"``) are accepted. Raises ValueError with the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '500ms', '30s' or '10m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = value.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
    joined = "".join(a + b for a, b in parts)
    if not parts or joined != re.sub(r"\s+", "", text):
        raise ValueError(f"{value!r} is not a duration (use e.g. '500ms', '30s', '10m', '1h')")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_size(value: str | int) -> int:
    """Bytes from ``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"4096"`` or an int.

    Binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units; case-insensitive.
    """
    if isinstance(value, bool | float):
        raise ValueError("a size is an integer number of bytes or a string such as '2GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _NUMBER_UNIT.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use e.g. '512MiB', '2GiB', '1GB')")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(n: int | float | None) -> str:
    """``"1.5 GiB"``-style text for a byte count; ``"-"`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``"250ms"``, ``"30s"``, ``"10m"``, ``"2h"``, ``"1h30m"``: the config's own notation."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    out, rest = [], seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            whole = int(rest // size)
            out.append(f"{whole}{unit}")
            rest -= whole * size
    if rest or not out:
        out.append(f"{rest:g}s")
    return "".join(out)


def format_size_exact(n: int) -> str:
    """The shortest exact unit form of ``n`` bytes ("512MiB", "2GiB", "1000")."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
