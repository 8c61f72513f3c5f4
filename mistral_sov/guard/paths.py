"""Outputs never overlap inputs, and --overwrite only replaces what msov itself published.

One check for every command that writes a folder (finetune, demo, export, registry): a flag can allow replacing an
old output, never deleting a base model, a data file or a folder msov did not write.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

# What marks a folder as msov's own: a run folder's summary, an export's provenance (inside) or signature (beside).
RUN_MARKERS = ("run.json",)
EXPORT_MARKERS = ("msov/provenance.json",)


def _real(path) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def refuse_overlap(output, inputs, *, what: str) -> None:
    """Refuse an output that is, contains or lies inside any input (paths resolved, symlinks followed)."""
    out = _real(output)
    for given in inputs:
        if given is None:
            continue
        src = _real(given)
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            relation = "is" if out == src else ("lies inside" if out.is_relative_to(src) else "contains")
            raise InputError(f"{what}: '{output}' {relation} the input '{given}'; writing there could delete it.",
                             hint=f"Choose a {what} outside every input.")


def refuse_foreign(target, *, markers=RUN_MARKERS + EXPORT_MARKERS, what: str) -> None:
    """An existing folder may be replaced only if msov wrote it (it carries one of msov's records)."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise InputError(f"{what}: '{target}' exists and is not a folder msov published; msov will not replace it.",
                         hint=f"Remove it yourself or choose another {what}.")
    signed_beside = target.with_name(target.name + ".sig").is_file()
    if signed_beside or any((target / marker).is_file() for marker in markers) or not any(target.iterdir()):
        return
    raise InputError(f"{what}: '{target}' exists and was not written by msov (no {' or '.join(markers)} inside); "
                     "--overwrite replaces only msov's own outputs.",
                     hint=f"Remove it yourself or choose another {what}.")


def pid_alive(pid: int) -> bool:
    """Is process `pid` still running? Leftovers of a dead writer (its pid in their name) may be removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
