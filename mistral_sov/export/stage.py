"""The one way msov puts a finished folder at its final name: built elsewhere, then renamed into place.

Nothing half-written ever carries a final name. Three callers share it:
- a run: `OUT.partial/` (kept across a crash, so that --resume can continue it) renamed to `OUT/`;
- an `--out` export: a stage `TARGET.tmp-<pid>/TARGET/` (removed on failure), its signature renamed to
  `TARGET.sig` beside it first;
- a registry entry: the same stage, its signature `model.sig` inside, never replacing a published version.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..guard.paths import pid_alive


class TargetExists(InputError):
    """The target name is taken and the caller did not ask to replace it."""


@dataclass
class Stage:
    root: Path  # TARGET.tmp-<pid>/: removed on any failure
    folder: Path  # TARGET.tmp-<pid>/<TARGET name>/: signed under its final name (the OMS subject name)
    sig: Path  # where sign_folder writes the signature before it is published


def publish(folder: Path, target: Path, *, overwrite: bool, sig: Path | None = None,
            sig_beside: bool = False) -> Path | None:
    """Rename `folder` to `target`. Returns the signature's published path (TARGET.sig), if one was placed.

    overwrite: an existing target is moved aside to TARGET.old-<pid>, the new folder renamed in, then the old one
    removed, so a crash in between loses neither. Without it an existing target raises TargetExists; a concurrent
    publisher's non-empty folder makes the rename itself fail, so two publishers never both win one name.
    sig_beside: the target's signature lives beside it. `sig` is renamed to TARGET.sig before the folder, so a
    folder at the target name is never an unsigned leftover of a signed export; with no `sig`, an old TARGET.sig
    is removed (a signature of something else must not sit beside the new folder).
    """
    target = Path(target)
    sig_target = target.with_name(target.name + ".sig")
    old = None
    if target.exists():
        if not overwrite:
            raise TargetExists(f"{target}: already exists.", hint="Pass --overwrite to replace it.")
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    if sig_beside and sig is not None:
        os.replace(sig, sig_target)
    elif sig_beside:
        sig_target.unlink(missing_ok=True)
    try:
        (os.replace if overwrite else os.rename)(folder, target)
    except OSError as exc:  # another publisher took the name between our check and now
        if overwrite or exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise TargetExists(f"{target}: already exists.", hint="Pass --overwrite to replace it.") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return sig_target if sig_beside and sig is not None else None


def publish_run(work_dir: Path, out_dir: Path) -> None:
    """Swap a finished run (OUT.partial/) into place; an older run at OUT is removed only after the swap.
    Whether it may be replaced at all was decided when the run started (train/run_folder.check_targets)."""
    publish(work_dir, out_dir, overwrite=True)


@contextmanager
def staged(target: Path, *, sig_inside: str | None = None):
    """A folder to build an export in, beside the target; whatever is left of it is removed on failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_stages(target)
    root = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    (root / target.name).mkdir(parents=True)
    folder = root / target.name
    stage = Stage(root, folder, folder / sig_inside if sig_inside else root / f"{target.name}.sig")
    try:
        yield stage
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_target(target: Path, overwrite: bool) -> None:
    """Before any work: an export replaces an existing folder only when asked, and only one msov published."""
    if Path(target).exists() and not overwrite:
        raise InputError(f"{target}: already exists; msov never replaces an export unless asked.",
                         hint="Pass --overwrite, or choose another --out.")
    from ..guard.paths import refuse_foreign

    refuse_foreign(target, what="--out")  # --overwrite replaces msov's own exports only


def _remove_stale_stages(target: Path) -> None:
    """Stages left by a killed export (its pid is gone) are removed; a live one belongs to a concurrent export."""
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
