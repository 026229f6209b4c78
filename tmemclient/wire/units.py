"""Sizes as people write them: ``4096``, ``64K``, ``256MiB``, ``1.5G``. Binary multiples throughout,
as systemd's MemoryMax= reads them: K = KiB = 1024."""

from __future__ import annotations

import argparse
import re
from typing import Final

_UNITS: Final = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes for ``text``; ValueError with what is accepted when it does not parse."""
    match = _SIZE.match(text)
    if not match or (match.group(2) == "" and text.strip().lower().endswith("ib")):
        raise ValueError(
            f"cannot read size {text!r}: give bytes, or a number with K, M, G, T "
            "(or KiB, MiB, GiB, TiB), e.g. 256MiB"
        )
    number: str = match.group(1)
    unit: str = match.group(2)
    scale: int = 1 << (10 * _UNITS[str(unit).upper()])
    if "." not in number:
        return int(number) * scale  # exact, however large
    whole, frac = number.split(".")
    numerator = int(whole + frac) * scale
    denominator: int = 10 ** len(frac)
    if numerator % denominator:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return numerator // denominator


def size_arg(text: str) -> int:
    """``parse_size`` for argparse ``type=``: a bad size is a usage error naming the value."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: int) -> str:
    """A short human form: 0, 512B, 4.0KiB, 256.0MiB."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f}{unit}"
    raise AssertionError("unreachable")
