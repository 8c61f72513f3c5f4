"""Sizes on the command line (`--shard-size`, `--gpu-mem`), with one meaning of each unit everywhere.

As transformers reads them (`convert_file_size_to_int`, which `max_shard_size="5GB"` goes through): GB is 10^9 bytes,
GiB is 2^30; likewise KB/MB/TB and KiB/MiB/TiB. A unit letter alone (5G) is the decimal unit; a bare number is
bytes. A GPU sold as "80GB" holds 80 GiB, so write --gpu-mem 80GiB to plan for all of it.
"""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, option: str, unit_required: bool = False) -> int:
    """'5GB' (5 * 10^9), '500MiB' (500 * 2^20), '1024' (bytes) -> bytes; a UsageError naming `option` otherwise.

    unit_required: a bare number is refused rather than read as bytes (--gpu-mem 80 once meant 80 GiB; reading it
    as 80 bytes now would be a wrong answer instead of an error)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"{option} {text!r}: expected a size such as 24GB, 500MB or 80GiB.",
                         hint="GB = 10^9 bytes, GiB = 2^30 bytes (as transformers reads them).")
    letter, suffix = match.group(2).upper(), (match.group(3) or "").upper()
    if unit_required and not letter and not suffix:
        raise UsageError(f"{option} {text!r}: give the unit, e.g. {match.group(1)}GiB or {match.group(1)}GB.",
                         hint="GB = 10^9 bytes, GiB = 2^30 bytes (as transformers reads them).")
    if suffix == "IB" and not letter:  # "5iB" is no unit
        raise UsageError(f"{option} {text!r}: expected a size such as 24GB, 500MB or 80GiB.")
    base = 1024 if suffix == "IB" else 1000
    return int(float(match.group(1)) * base ** " KMGT".index(letter or " "))
