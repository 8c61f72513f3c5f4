"""Where a run lives: `OUT.partial/` while it runs, `OUT/` once published, and what may not be lost on the way.

An existing finished run is replaced only with --overwrite; an unfinished one is continued only with --resume and
the same recipe (only the run length may change) or discarded only with --overwrite; the finished folder is
swapped into place with a rename, so nothing half-written ever looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import InputError
from .recipe import Recipe

# What may change on --resume: the run's length, who signs it (the signing key changes who vouches for the adapter,
# not the adapter) and what is logged; nothing that changes the weights.
RESUMABLE_FIELDS = {("train", "epochs"), ("train", "max_steps"), ("output", "sign_key"), ("train", "tensorboard"),
                    ("train", "logging_steps"), ("train", "eval_steps")}


def check_targets(recipe: Recipe, out_dir: Path, work_dir: Path, *, resume: bool, overwrite: bool, main: bool):
    """Return the checkpoint to resume from (or None), after refusing anything that would lose work."""
    from .training import latest_checkpoint

    if not main:  # rank 0 checks and creates; another rank's check would race with rank 0's mkdir
        # ...but every rank must find the checkpoint: one that started afresh would train a different run.
        return _checkpoint_to_resume(work_dir) if resume else None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output.dir: cannot create '{out_dir.parent}': {exc.strerror}.") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise InputError(f"output.dir: '{out_dir.parent}' is not writable (read-only file system or permissions).")

    if out_dir.exists() and not overwrite and not resume:
        raise InputError(f"output.dir: '{out_dir}' already holds a finished run.",
                         hint="Pass --overwrite to replace it, or --set output.dir=ANOTHER_DIR.")
    if resume:
        checkpoint = _checkpoint_to_resume(work_dir)
        check_same_recipe(recipe, work_dir / "recipe.yaml")
        return checkpoint
    if work_dir.exists() and not overwrite:
        step = latest_checkpoint(work_dir / "checkpoints")
        raise InputError(f"'{work_dir}' holds an unfinished run"
                         + (f" (last checkpoint: {step.name})." if step else "."),
                         hint="Pass --resume to continue it, or --overwrite to discard it.")
    return None


def _checkpoint_to_resume(work_dir: Path) -> Path:
    """The latest complete checkpoint (the same words on every rank, so that a failure on all is reported once)."""
    from .training import latest_checkpoint

    checkpoint = latest_checkpoint(work_dir / "checkpoints")
    if checkpoint is None:
        raise InputError(f"--resume: no checkpoint found in '{work_dir / 'checkpoints'}'.",
                         hint="Checkpoints are written every train.save_steps steps of an unfinished run; on "
                              "several machines every one must see the run folder (a shared file system).")
    return checkpoint


def check_same_recipe(recipe: Recipe, saved: Path) -> None:
    """Resuming with a different recipe would silently mix two runs; only the run length may change."""
    import yaml

    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text())
    new = recipe.model_dump(mode="json")
    changed = [f"{section}.{key}" for section in new if isinstance(new[section], dict)
               for key in new[section] if (section, key) not in RESUMABLE_FIELDS
               and old.get(section, {}).get(key) != new[section][key]]
    if changed:
        raise InputError(f"--resume: the recipe differs from the unfinished run's ({', '.join(changed)}).",
                         hint="Resume with the same recipe (only the run length, output.sign_key and what is logged may "
                              "change).")


def publish(work_dir: Path, out_dir: Path) -> None:
    """Swap the finished run into place; an older run at the target is removed only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(work_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
