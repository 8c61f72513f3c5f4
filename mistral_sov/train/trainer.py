"""transformers.Trainer wiring: arguments from the recipe, metrics.jsonl, progress events, checkpoints, resume."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import InputError
from ..events import EventSink
from ..recipe import TrainSection

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def make_collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    # Pads to the longest row of each batch; padded labels are -100 so they carry no loss.
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


def make_train_collator(tokenizer, *, packing: bool, max_seq_len: int, attn_implementation: str | None = None):
    """Packed, padding-free batches when `packing` (see data/packing.py), else padding to the longest row."""
    if not packing:
        return make_collator(tokenizer)
    from ..data.packing import PackingCollator

    # flash-attention separates packed rows only in a single flattened sequence; SDPA and eager take bins.
    flatten = (attn_implementation or "").startswith("flash_attention")
    return PackingCollator(pad_token_id=tokenizer.pad_token_id, max_seq_len=max_seq_len, flatten=flatten)


def supervised_logits(model, batch: dict):
    """Logits at the positions whose next token is supervised, and those next tokens.

    The LM head and the loss run only where a label is not -100: for chat data most positions are prompt,
    and with a large vocabulary the LM head is a large share of a small model's compute.
    `use_cache=False` is not an optimisation: with a cache, transformers ignores restarting `position_ids`
    and packed rows attend to one another (tests/test_packing.py checks both).
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    keep = targets != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _slices_logits(model):
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    else:
        outputs = model(**inputs, use_cache=False)
        outputs.logits = outputs.logits[keep]
    return outputs, targets[keep]


def _slices_logits(model) -> bool:
    """Every causal LM of transformers 5 takes `logits_to_keep` (a boolean mask included); remote code may not."""
    import inspect

    for wrapper in ("_orig_mod", "module"):  # torch.compile, DDP
        model = getattr(model, wrapper, model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def supervised_token_losses(model, batch: dict):
    """Cross-entropy of every supervised token of `batch`, in row-major order (fp32 whatever the model dtype)."""
    import torch.nn.functional as F

    outputs, targets = supervised_logits(model, batch)
    return F.cross_entropy(outputs.logits.float(), targets, reduction="none")


def training_arguments(train: TrainSection, checkpoint_dir: Path, *, has_eval: bool, packing: bool = True):
    import torch
    from transformers import TrainingArguments

    on_cuda = torch.cuda.is_available()
    if train.dtype == "fp16" and not on_cuda:
        raise InputError(
            "train.dtype: fp16 mixed precision needs a CUDA GPU; this machine has none.",
            hint="Use train.dtype: fp32 (or bf16 on a CPU that supports it).",
        )
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_steps if train.warmup_steps else train.warmup_ratio,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        seed=train.seed,
        data_seed=train.seed,
        bf16=train.dtype == "bf16",
        fp16=train.dtype == "fp16",
        use_cpu=not on_cuda,
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        save_only_model=False,
        eval_strategy="steps" if (has_eval and train.eval_steps) else "no",
        eval_steps=train.eval_steps,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda,
        include_num_input_tokens_seen="all",
        # Without packing, rows of like length share a batch so less of it is padding; a packed batch has none.
        train_sampling_strategy="group_by_length" if (train.group_by_length and not packing) else "random",
        torch_compile=train.torch_compile,
        prediction_loss_only=True,  # the Trainer's own evaluation keeps the loss only (logits are sliced)
        use_cache=False,  # the Trainer writes this into model.config; a cache would unpack packed rows
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every forward pass
    )


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
    import os

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


def trim_metrics(metrics_file: Path, after_step: int) -> None:
    """On resume, drop lines logged after the checkpoint: those steps run again and will be logged again."""
    if not metrics_file.is_file():
        return
    kept = [line for line in metrics_file.read_text(errors="replace").splitlines()
            if (record := _json_or_none(line)) is not None and record.get("step", 0) <= after_step]
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(metrics_file)


def _json_or_none(line: str):
    """A kill mid-write leaves a torn last line: it is dropped (its step runs again and is logged again)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _callbacks(metrics_file: Path, on_event: EventSink):
    from transformers import TrainerCallback

    class MetricsAndProgress(TrainerCallback):
        """One metrics.jsonl line per logging step; progress events for whoever renders them."""

        def __init__(self):
            self.started = time.monotonic()
            self.tokens_at_start = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.tokens_at_start = state.num_input_tokens_seen
            on_event("train_begin", {"max_steps": state.max_steps, "start_step": state.global_step})

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = max(time.monotonic() - self.started, 1e-9)
            tokens = state.num_input_tokens_seen - self.tokens_at_start
            on_event("step", {"step": state.global_step, "max_steps": state.max_steps,
                              "tokens_per_s": tokens / elapsed})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            record["tokens_seen"] = state.num_input_tokens_seen
            with open(metrics_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
            on_event("log", record)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # called once the Trainer finished writing the checkpoint
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return [MetricsAndProgress()]


def tensorboard_callback(log_dir: Path):
    """transformers' own TensorBoard callback, writing to `log_dir` on rank 0 (local event files, no server)."""
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(log_dir)
    return callback


def _trainer_class():
    from transformers import Trainer

    class SupervisedTrainer(Trainer):
        """The Trainer, with the loss computed only at supervised positions (see `supervised_logits`)."""

        # The loss below is divided by the supervised tokens of the whole accumulated batch, as HF's own is.
        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Makes the Trainer count `num_items_in_batch` (supervised tokens over accumulation and ranks).
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch.nn.functional as F

            outputs, targets = supervised_logits(model, inputs)
            loss = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
            if num_items_in_batch is None:
                loss = loss / max(targets.numel(), 1)
                if model.training:  # not normalised over the accumulated batch (training_step leaves it as is)
                    loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SupervisedTrainer


def build_trainer(model, tokenizer, train_dataset, eval_dataset, train: TrainSection, work_dir: Path,
                  on_event: EventSink, *, packing: bool = True):
    from transformers import PrinterCallback

    args = training_arguments(train, work_dir / "checkpoints", has_eval=eval_dataset is not None, packing=packing)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_train_collator(tokenizer, packing=packing, max_seq_len=train.max_seq_len,
                                          attn_implementation=attn),
        processing_class=tokenizer,
        callbacks=_callbacks(work_dir / "metrics.jsonl", on_event)
        + ([tensorboard_callback(work_dir / "tensorboard")] if train.tensorboard else []),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the CLI renders progress instead
    return trainer
