"""Byte-size parsing and formatting: memory budgets accept strings such as "16GiB" or "36GB"."""

import re

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: "int | float | str") -> int:
    """Bytes in ``value``: a number of bytes, or a string like "16GiB", "36GB", "512MiB"."""
    if isinstance(value, bool):
        raise ConfigError(f"memory size {value!r} is not a size", 'give bytes or a string like "16GiB"')
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"memory size {value!r} is not positive", "give a positive size")
        return int(value)
    match = _PATTERN.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"memory size {value!r} has unknown units",
            "write it as a number with B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
            'e.g. "16GiB"',
        )
    size = float(match.group(1)) * _UNITS[unit]
    if size <= 0:
        raise ConfigError(f"memory size {value!r} is not positive", "give a positive size")
    return int(size)


def format_bytes(num_bytes: float) -> str:
    """A short human-readable size, powers of 1024."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")
