"""Where a run lives: `OUT.partial/` while it runs, `OUT/` once published, and what may not be lost on the way.

An existing finished run is replaced only with --overwrite; an unfinished one is continued only with --resume and
the same recipe (only the run length may change) or discarded only with --overwrite; the finished folder is
swapped into place with a rename, so nothing half-written ever looks complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..events import EventSink
from ..recipe import Recipe
from ..trust.hashing import write_atomic

# What may change on --resume: the run's length, who signs it (the signing key changes who vouches for the adapter,
# not the adapter), what is logged, and what the user states about the base (its pre-training compute, a fact for the
# dossier); nothing that changes the weights.
RESUMABLE_FIELDS = {("train", "epochs"), ("train", "max_steps"), ("output", "sign_key"), ("train", "tensorboard"),
                    ("train", "logging_steps"), ("train", "eval_steps"), ("model", "base_training_flops")}


@dataclass(frozen=True)
class Target:
    """Where a run goes, and where it continues from."""

    out_dir: Path  # the finished run, once published
    work_dir: Path  # OUT.partial/: the run while it runs (checkpoints, metrics.jsonl, recipe.yaml, inputs.json)
    checkpoint: Path | None = None  # the checkpoint --resume continues from

    @classmethod
    def of(cls, recipe: Recipe) -> "Target":
        out_dir = Path(recipe.output.dir)
        return cls(out_dir, out_dir.with_name(out_dir.name + ".partial"))


def refuse_overlapping_inputs(recipe: Recipe, out_dir: Path, work_dir: Path) -> None:
    """Whatever the flags: --overwrite must never delete the base model or a data file."""
    from ..guard.paths import refuse_overlap

    inputs = [recipe.model.path, recipe.model.adapter, *(f.path for f in recipe.data.train + recipe.data.eval)]
    for target in (out_dir, work_dir, out_dir.with_name(out_dir.name + ".lock")):
        refuse_overlap(target, inputs, what="output.dir")


@contextmanager
def run_lock(out_dir: Path):
    """Hold OUT.lock (flock, exclusive) for the whole run: a second run into the same folder is refused at once.

    The kernel drops a flock when its holder dies, so a crashed run's leftover lock file never blocks; its pid text
    is only there to name the holder. The holder removes the file before it lets go; a run that locked a file which
    was meanwhile removed (or replaced) tries again on the current one, so two runs never hold two inodes."""
    lock_path = out_dir.with_name(out_dir.name + ".lock")
    while True:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"output.dir: cannot create the run lock '{lock_path}': {exc.strerror}.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"output.dir: '{out_dir}' is in use by another msov run (pid {holder}, lock "
                             f"'{lock_path}').", hint="Wait for it to finish, or choose another output.dir.") from None
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed it between our open and our lock: take the current file
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        try:
            os.unlink(lock_path)  # still held: a run waiting on this inode re-checks and takes a fresh file
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the flock


def check_targets(recipe: Recipe, out_dir: Path, work_dir: Path, *, resume: bool, overwrite: bool, main: bool):
    """Return the checkpoint to resume from (or None), after refusing anything that would lose work."""
    from ..guard.paths import refuse_foreign
    from .checkpoints import latest_checkpoint

    refuse_overlapping_inputs(recipe, out_dir, work_dir)
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
    if overwrite and not resume:
        refuse_foreign(out_dir, markers=("run.json",), what="output.dir")
        refuse_foreign(work_dir, markers=("recipe.yaml", "checkpoints", "run.json"), what="output.dir")
    if resume:
        checkpoint = _checkpoint_to_resume(work_dir)
        check_same_recipe(recipe, work_dir / "recipe.yaml")
        if checkpoint is None:  # the run starts over in work_dir: only if it is msov's own unfinished run
            refuse_foreign(work_dir, markers=("recipe.yaml", "checkpoints", "inputs.json"), what="output.dir")
        return checkpoint
    if work_dir.exists() and not overwrite:
        step = latest_checkpoint(work_dir / "checkpoints")
        raise InputError(f"'{work_dir}' holds an unfinished run"
                         + (f" (last checkpoint: {step.name})." if step else "."),
                         hint="Pass --resume to continue it, or --overwrite to discard it.")
    return None


def _checkpoint_to_resume(work_dir: Path) -> Path | None:
    """The latest complete checkpoint (the same words on every rank, so that a failure on all is reported once).

    None when the unfinished run was stopped before its first checkpoint was complete: it starts again from step 0,
    as nothing of it was kept."""
    from .checkpoints import resume_point

    checkpoint = resume_point(work_dir / "checkpoints")
    if checkpoint is None and not work_dir.is_dir():
        raise InputError(f"--resume: no checkpoint found in '{work_dir / 'checkpoints'}'.",
                         hint="Checkpoints are written every train.save_steps steps of an unfinished run; on "
                              "several machines every one must see the run folder (a shared file system).")
    return checkpoint


def check_same_recipe(recipe: Recipe, saved: Path) -> None:
    """Resuming with a different recipe would silently mix two runs; only the run length may change."""
    import yaml

    if not saved.is_file():
        return
    def fields(recipe_json: dict) -> dict:  # a section may be null (quantization off): compare it whole then
        return {(section, key): v for section, body in (recipe_json or {}).items()
                for key, v in (body.items() if isinstance(body, dict) else [(None, body)])}

    old, new = fields(yaml.safe_load(saved.read_text())), fields(recipe.model_dump(mode="json"))
    changed = sorted({f"{s}.{k}" if k else s for s, k in old.keys() | new.keys()
                      if (s, k) not in RESUMABLE_FIELDS and old.get((s, k)) != new.get((s, k))})
    if changed:
        raise InputError(f"--resume: the recipe differs from the unfinished run's ({', '.join(changed)}).",
                         hint="Resume with the same recipe (only the run length, output.sign_key and what is logged "
                              "may change).")


def check_same_inputs(record_path: Path, record: dict, *, resume: bool) -> None:
    """The bytes a run trains on are recorded when it starts; --resume refuses if any of them changed since, as
    the earlier steps saw the old ones (data files by position, base-model and start-adapter files by name:
    tokenizer included)."""
    if not resume or not record_path.is_file():  # a fresh run, or one checkpointed before inputs were recorded
        write_atomic(record_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        return
    try:
        old = json.loads(record_path.read_text())
    except ValueError:
        raise InputError(f"--resume: '{record_path}' is unreadable; the inputs of the earlier steps are unknown.",
                         hint="Start again with --overwrite.") from None
    pairs = [(f"data file {i + 1} ({new_path})", old_sha, new_sha) for i, ((_, old_sha), (new_path, new_sha))
             in enumerate(zip(old.get("data", []), record["data"]))]
    if len(old.get("data", [])) != len(record["data"]):
        pairs.append(("number of data files", len(old.get("data", [])), len(record["data"])))
    old_base, new_base = old.get("base_model", {}), record["base_model"]
    pairs += [(f"base model file '{name}'", old_base.get(name), new_base.get(name))
              for name in sorted(old_base.keys() | new_base.keys())]
    old_start, new_start = old.get("start_adapter") or {}, record.get("start_adapter") or {}
    pairs += [(f"start adapter file '{name}' (model.adapter)", old_start.get(name), new_start.get(name))
              for name in sorted(old_start.keys() | new_start.keys())]
    changed = [(what, a, b) for what, a, b in pairs if a != b]
    if changed:
        what, a, b = changed[0]
        raise InputError(f"--resume: {what} changed since the run started (sha256 {a} recorded in "
                         f"'{record_path}', now {b})" + (f", and {len(changed) - 1} more" if len(changed) > 1 else "")
                         + "; the earlier steps trained on the old bytes.",
                         hint="Resume with the inputs the run started with, or start again with --overwrite.")


def start_afresh(target: Target, *, resume: bool, on_event: EventSink) -> None:
    """An unfinished run the user chose to --overwrite, or to --resume when none of it was kept: an empty
    work_dir. (Rank 0 only; the checks before made sure nothing else is lost.)"""
    if resume:
        on_event("warning", {"text": f"no complete checkpoint in '{target.work_dir}' (the run was stopped before "
                                     "its first one was written): starting again from step 0"})
    shutil.rmtree(target.work_dir, ignore_errors=True)
    target.work_dir.mkdir(parents=True)


def record_inputs(target: Target, base_model: Path, data_files: list, *, main: bool, on_event: EventSink,
                  start_adapter: Path | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Hash the base model's files (and the start adapter's, model.adapter) and record them with the data files'
    digests in inputs.json, or, when resuming, check they are the ones recorded. Returns the base model's and the
    start adapter's {file name: sha256} ({} without one)."""
    from ..model.start_adapter import START_ADAPTER_FILES
    from ..trust.hashing import digest_folder, hash_files
    from .ranks import all_ranks_agree

    on_event("stage", {"text": "hashing base model"})
    base_digests = digest_folder(base_model)
    start = dict(zip(START_ADAPTER_FILES, hash_files([start_adapter / n for n in START_ADAPTER_FILES]))) \
        if start_adapter is not None else {}
    inputs = {"data": [[str(f.path), f.sha256] for f in data_files], "base_model": base_digests}
    if start:  # absent otherwise: inputs.json of a fresh-adapter run reads as before
        inputs["start_adapter"] = start
    all_ranks_agree(lambda: check_same_inputs(target.work_dir / "inputs.json", inputs,
                                              resume=target.checkpoint is not None) if main else None)
    return base_digests, start


def ready_to_train(target: Target, recipe: Recipe, on_event: EventSink) -> list[dict]:
    """Rank 0, just before training: the resolved recipe written; when resuming, what the Trainer must not find
    removed and metrics.jsonl cut back to the checkpoint. Returns the metrics lines kept (none for a fresh run)."""
    from .checkpoints import checkpoint_step, discard_unusable, trim_metrics

    write_atomic(target.work_dir / "recipe.yaml", recipe.to_yaml().encode())
    if target.checkpoint is None:
        return []
    discard_unusable(target.work_dir / "checkpoints", target.checkpoint, on_event)
    kept = trim_metrics(target.work_dir / "metrics.jsonl", checkpoint_step(target.checkpoint))
    on_event("stage", {"text": f"resuming from {target.checkpoint.name}"})
    return kept
