"""Checkpoints of an unfinished run: which are complete, which one --resume continues from, and the metrics
lines that go with it. The Trainer writes checkpoint-N/ in place; msov marks one complete only once all of it
is on disk, so a kill mid-save never leaves a checkpoint that looks usable."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import InputError
from ..events import EventSink

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

COMPLETE_MARKER = "msov-complete"  # written last, fsynced: the Trainer itself writes checkpoint-N/ in place


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
    """Marked complete after every file was fsynced, and still readable (a later truncation is caught too)."""
    from safetensors import SafetensorError, safe_open

    if not (checkpoint / COMPLETE_MARKER).is_file():
        return False
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        for weights in checkpoint.rglob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def mark_complete(checkpoint: Path) -> None:
    for item in sorted(checkpoint.rglob("*")):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as handle:
        handle.write("ok\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint / COMPLETE_MARKER)
    for folder in (checkpoint, checkpoint.parent):
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
            shutil.rmtree(partial, ignore_errors=True)
            on_event("warning", {"text": f"skipped {partial.name}: incomplete (the run was stopped while "
                                         "writing it)"})
        elif checkpoint_step(partial) > checkpoint_step(resume_from):
            shutil.rmtree(partial, ignore_errors=True)
            on_event("warning", {"text": f"skipped {partial.name}: written at the run's last step; its last "
                                         f"steps run again from {resume_from.name}"})
