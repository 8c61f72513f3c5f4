"""transformers.Trainer wiring: arguments from the recipe, metrics.jsonl, progress events, a clean stop on
Ctrl-C or SIGTERM, resume; `train` runs it and hands on what it measured (the metrics history included)."""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, Interrupted
from ..events import EventSink
from ..recipe import TrainSection
from .checkpoints import check_resumable, keep_newest, mark_complete
from .logits import supervised_logits, supervised_token_logps  # noqa: F401 - supervised_logits: tests read it here
from .ranks import all_ranks_agree


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
        # Offloading needs the reentrant form: it saves each layer's input through autograd's saved-tensor hooks,
        # which `offloaded_activations` moves to host memory; the non-reentrant form keeps it in a closure.
        gradient_checkpointing_kwargs=({"use_reentrant": train.offload_activations}
                                       if train.gradient_checkpointing else None),
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,  # msov keeps train.save_total_limit itself, by step (see checkpoints.keep_newest)
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
        # (Preference pairs have no single length to group by.)
        train_sampling_strategy=("group_by_length" if (train.group_by_length and not packing and train.method == "sft")
                                 else "random"),
        torch_compile=train.torch_compile,
        prediction_loss_only=True,  # the Trainer's own evaluation keeps the loss only (logits are sliced)
        use_cache=False,  # the Trainer writes this into model.config; a cache would unpack packed rows
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every forward pass
    )


def trainer_callbacks(metrics_file: Path, on_event: EventSink, history: list[dict], keep: int):
    from transformers import TrainerCallback

    class MetricsAndProgress(TrainerCallback):
        """One metrics.jsonl line per logging step, kept in `history` too (the run reads it from there, not back
        from the file); progress events for whoever renders them."""

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
            line = json.dumps(record, sort_keys=True)
            with open(metrics_file, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
            history.append(json.loads(line))  # as a reader of metrics.jsonl would find it
            on_event("log", record)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # called once the Trainer finished writing the checkpoint
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                keep_newest(Path(args.output_dir), keep)

    return [MetricsAndProgress()]


def tensorboard_callback(log_dir: Path):
    """transformers' own TensorBoard callback, writing to `log_dir` on rank 0 (local event files, no server)."""
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(log_dir)
    return callback


@contextmanager
def offloaded_activations(enabled: bool):
    """While the forward pass runs, tensors autograd saves on a CUDA device go to pinned host memory and come back
    when backward needs them. With reentrant checkpointing those are each layer's input (the layer itself saves
    nothing: it is recomputed). Both copies are asynchronous on the compute stream: the host never waits for the
    device-to-host copy, and the copy back is queued ahead of the layer's recompute. On CPU there is nothing to move
    (the plan counts the layer inputs in host memory either way)."""
    import torch

    if not enabled or not torch.cuda.is_available():
        yield
        return

    def pack(tensor):
        if tensor.device.type != "cuda" or tensor.numel() < 65536:  # small tensors are not worth a transfer
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def tile_mlps(model, chunk: int) -> int:
    """Run each dense MLP block chunk-wise over the tokens, each chunk checkpointed; returns the blocks tiled.

    Under gradient checkpointing a layer's recompute holds its MLP activations (gate, up, SiLU, LoRA inputs:
    three quarters of a Mistral layer's) for every token at once; tiled, for `chunk` tokens. The MLP is per token,
    so the result is the same (LoRA dropout draws its masks chunk by chunk). Rows of at most `chunk` tokens, and
    every pass without gradients, run the block as it is; the module tree and its state dict are unchanged."""
    from functools import partial

    tiled = 0
    for module in model.modules():
        if type(module).__name__.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "down_proj")):
            if not isinstance(module.forward, partial):
                module.forward = partial(_tiled_forward, module.forward, chunk)
            tiled += 1
    return tiled


def _tiled_forward(forward, chunk: int, x):
    import torch
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled() or x.shape[:-1].numel() <= chunk:
        return forward(x)
    flat = x.reshape(1, -1, x.shape[-1])
    parts = [checkpoint(forward, part, use_reentrant=False) for part in flat.split(chunk, dim=1)]
    return torch.cat(parts, dim=1).view(*x.shape[:-1], -1)


def _trainer_class(settings: TrainSection | None = None):
    from transformers import Trainer

    settings = settings or TrainSection()

    class SupervisedTrainer(Trainer):
        """The Trainer, with the loss computed only at supervised positions, the LM head and loss in chunks (see
        `supervised_token_logps`), checkpointed activations offloaded to host memory when asked."""

        # The loss below is divided by the supervised tokens of the whole accumulated batch, as HF's own is.
        loss_is_scaled_for_ga = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Makes the Trainer count `num_items_in_batch` (supervised tokens over accumulation and ranks).
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            offload = settings.offload_activations and settings.gradient_checkpointing and model.training
            with offloaded_activations(offload):
                logps, targets, _ = supervised_token_logps(model, inputs, chunk=settings.loss_chunk)
            loss = -logps.sum()  # the summed cross-entropy of the supervised tokens
            outputs = {"token_logps": logps}
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
                  on_event: EventSink, *, packing: bool = True, history: list[dict] | None = None):
    """The Trainer for one run; each line it logs to metrics.jsonl is appended to `history` as well."""
    from transformers import PrinterCallback

    args = training_arguments(train, work_dir / "checkpoints", has_eval=eval_dataset is not None, packing=packing)
    if train.gradient_checkpointing:
        tile_mlps(model, train.mlp_chunk)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if train.method in ("dpo", "orpo"):  # preference pairs: their collator and loss
        from transformers import Trainer

        from .preference import PairCollator, preference_trainer_class

        trainer_class, collator = preference_trainer_class(Trainer, train), PairCollator(tokenizer.pad_token_id)
    else:
        trainer_class = _trainer_class(train)
        collator = make_train_collator(tokenizer, packing=packing, max_seq_len=train.max_seq_len,
                                       attn_implementation=attn)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=trainer_callbacks(work_dir / "metrics.jsonl", on_event, [] if history is None else history,
                                    train.save_total_limit)
        + ([tensorboard_callback(work_dir / "tensorboard")] if train.tensorboard else []),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the CLI renders progress instead
    return trainer


@dataclass
class Trained:
    """What a finished `train` hands on: the Trainer's own figures, the metrics history and the module it trained
    through (the PEFT model wrapped by DDP, FSDP or DeepSpeed: what gathering and generation must go through)."""

    steps: int
    train_loss: float  # the Trainer's mean since the (last) start
    tokens_seen: int
    runtime_s: float | None
    model_wrapped: object
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl's lines, earlier ones of a resumed run first

    @property
    def losses(self) -> list[float]:
        return [line["loss"] for line in self.metrics if "loss" in line]


def train(model, tokenizer, train_dataset, eval_dataset, settings: TrainSection, work_dir: Path,
          on_event: EventSink, *, packing: bool, resume_from: Path | None = None,
          earlier_metrics: list[dict] | None = None) -> Trained:
    """Train (from `resume_from` when resuming, `earlier_metrics` being what was logged before it). The first
    Ctrl-C or SIGTERM ends training at the next step boundary with a checkpoint, raised as Interrupted."""
    history = list(earlier_metrics or [])
    trainer = build_trainer(model, tokenizer, train_dataset, eval_dataset, settings, work_dir, on_event,
                            packing=packing, history=history)
    if resume_from is not None:  # FSDP or not is known once the Trainer has its Accelerator; agree, report once
        all_ranks_agree(lambda: check_resumable(resume_from, fsdp=trainer.is_fsdp_enabled))
    stop = _stop_at_step_boundary(trainer)
    with _first_ctrl_c_requests(stop):
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    on_event("train_end", {})
    if stop["requested"]:
        stopped = Interrupted(f"interrupted at step {trainer.state.global_step}; a checkpoint was saved in "
                              f"'{work_dir / 'checkpoints'}'.", hint="Continue with the same command plus --resume.")
        stopped.exit_code = 128 + stop["signal"]  # 130 after Ctrl-C, 143 after SIGTERM, as shells report them
        raise stopped
    return Trained(steps=trainer.state.global_step, train_loss=output.training_loss,
                   tokens_seen=trainer.state.num_input_tokens_seen, runtime_s=output.metrics.get("train_runtime"),
                   model_wrapped=trainer.model_wrapped, metrics=history)


def _stop_at_step_boundary(trainer) -> dict:
    """A callback that, once asked, finishes the current step, saves a checkpoint and ends training."""
    from transformers import TrainerCallback

    stop = {"requested": False}

    class StopWhenAsked(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop["requested"]:
                control.should_save = True
                control.should_training_stop = True

    trainer.add_callback(StopWhenAsked())
    return stop


@contextmanager
def _first_ctrl_c_requests(stop: dict):
    """The first Ctrl-C (or SIGTERM, as sent by schedulers) asks for a clean stop at the next step boundary; a
    second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"], stop["signal"] = True, signum

    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
