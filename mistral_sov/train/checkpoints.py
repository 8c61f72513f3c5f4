"""Checkpoints of an unfinished run: which are complete, which one --resume continues from, which are removed, and
the metrics lines that go with it. The Trainer writes checkpoint-N/ in place; msov marks one complete only once all
of it is on disk, so a kill mid-save never leaves a checkpoint that looks usable, and unmarks one before removing
it, so a kill mid-removal does not either."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import InputError
from ..events import EventSink

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

COMPLETE_MARKER = "msov-complete"  # written last, fsynced, listing every file and its size


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = checkpoints(checkpoint_dir)
    complete = [p for p in found if is_complete(p)]
    return complete[-1] if complete else None


def resume_point(checkpoint_dir: Path) -> Path | None:
    """The checkpoint --resume continues from: the newest complete one, unless it was written at the run's last step
    (a kill during the adapter's export). Resumed there, the Trainer (transformers 5.x) trains one step past the end
    and checkpoints it, and a second resume from that one gave another adapter; so the one before it is taken and
    its last steps run again (or the run starts over when there is none)."""
    complete = [p for p in checkpoints(checkpoint_dir) if is_complete(p)]
    if complete:
        state = json.loads((complete[-1] / "trainer_state.json").read_text())
        if state.get("global_step", 0) >= state.get("max_steps", float("inf")):
            complete.pop()
    return complete[-1] if complete else None


def checkpoints(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    """Marked complete after every file was fsynced, every file the marker lists still there at its size, and
    still readable (a later truncation, or a removal stopped halfway, is caught too)."""
    from safetensors import SafetensorError, safe_open

    try:
        marker = (checkpoint / COMPLETE_MARKER).read_text()
        listed = json.loads(marker) if marker.strip() != "ok" else {}  # "ok": before files were listed
        if not isinstance(listed, dict):
            return False
        for name, size in listed.items():
            if (checkpoint / name).stat().st_size != size:
                return False
        json.loads((checkpoint / "trainer_state.json").read_text())
        for weights in checkpoint.rglob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def mark_complete(checkpoint: Path) -> None:
    files = {}
    for item in sorted(checkpoint.rglob("*")):
        if item.is_file() and item.name not in (COMPLETE_MARKER, COMPLETE_MARKER + ".tmp"):
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
            files[item.relative_to(checkpoint).as_posix()] = item.stat().st_size
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(files, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / COMPLETE_MARKER)
    for folder in (checkpoint, checkpoint.parent):
        _fsync_folder(folder)


def remove(checkpoint: Path) -> None:
    """Unmarked (and that made durable) before anything else goes: a kill mid-removal leaves an incomplete
    checkpoint, never a complete-looking one with files missing."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    if checkpoint.is_dir():
        _fsync_folder(checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)


def keep_newest(checkpoint_dir: Path, keep: int) -> None:
    """train.save_total_limit, applied by step number once the newest checkpoint is marked complete.

    The Trainer's own rotation (transformers 5.x) orders checkpoints by folder mtime and runs before msov marks the
    new one: a folder half-removed by a kill is "newer" than the one --resume needs, which it then deleted (seen in
    CI: the next resume found only the half-removed checkpoint-2 and crashed). Here the order is the step number,
    only complete checkpoints count towards `keep`, and incomplete leftovers older than the newest go too."""
    found = checkpoints(checkpoint_dir)
    complete = [p for p in found if is_complete(p)]
    if not complete:
        return
    kept = set(complete[-keep:])
    for folder in found:
        if folder not in kept and checkpoint_step(folder) < checkpoint_step(complete[-1]):
            remove(folder)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_resumable(checkpoint: Path, *, fsdp: bool) -> None:
    """The Trainer reads a checkpoint back only into the engine that wrote it: FSDP's is sharded (accelerate's
    pytorch_model_fsdp_0/ and optimizer_0/), any other is a PEFT adapter beside optimizer.pt. Measured
    (transformers 5.24, accelerate 1.15): a switch fails only after the model is loaded, with "ValueError: Checkpoint
    found at ... is only supported when using PyTorch FSDP" one way and FileNotFoundError on optimizer_0 the other."""
    sharded = any(p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())
    if sharded == fsdp:
        return
    wrote, now = ("under FSDP", "without FSDP") if sharded else ("without FSDP (one process or DDP)", "under FSDP")
    raise InputError(f"--resume: '{checkpoint}' was written by a run {wrote} and this launch trains {now}; a "
                     "checkpoint can be resumed only by the engine that wrote it.",
                     hint="Resume with the launch command of the interrupted run (the same accelerate config), "
                          "or start again with --overwrite.")


def checkpoint_step(checkpoint: Path) -> int:
    return int(CHECKPOINT_RE.match(checkpoint.name).group(1))


def trim_metrics(metrics_file: Path, after_step: int) -> list[dict]:
    """On resume, drop lines logged after the checkpoint: those steps run again and will be logged again. Returns
    the lines kept: the run's metrics history up to the checkpoint, which the resumed training continues."""
    if not metrics_file.is_file():
        return []
    kept = [(line, record) for line in metrics_file.read_text(errors="replace").splitlines()
            if (record := _json_or_none(line)) is not None and record.get("step", 0) <= after_step]
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line, _ in kept))
    tmp.replace(metrics_file)
    return [record for _, record in kept]


def _json_or_none(line: str):
    """A kill mid-write leaves a torn last line: it is dropped (its step runs again and is logged again)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def discard_unusable(checkpoint_dir: Path, resume_from: Path, on_event: EventSink) -> None:
    """Before a resume: remove what the Trainer must not find beside `resume_from`. A kill mid-save leaves an
    incomplete checkpoint (that step runs and saves again); one past `resume_from` was written at the run's last
    step (see `resume_point`), and the Trainer rewrites it in place."""
    for partial in checkpoints(checkpoint_dir):
        if not is_complete(partial):
            remove(partial)
            on_event("warning", {"text": f"skipped {partial.name}: incomplete (the run was stopped while "
                                         "writing it)"})
        elif checkpoint_step(partial) > checkpoint_step(resume_from):
            remove(partial)
            on_event("warning", {"text": f"skipped {partial.name}: written at the run's last step; its last "
                                         f"steps run again from {resume_from.name}"})
