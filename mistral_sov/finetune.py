"""`msov finetune`: the whole run as a list of stages, from a validated recipe to a finished run folder.

The run is built in `<output.dir>.partial/` (checkpoints, metrics.jsonl, resolved recipe) and renamed to
`<output.dir>/` only after the adapter and run.json are written, so a crash never leaves a folder that looks done.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import Interrupted
from .offline import enforce_offline_env
from .ranks import all_ranks_agree, is_main_process, world_size
from .recipe import Recipe, load_recipe
from .run_folder import (check_same_inputs, check_targets, publish, refuse_overlapping_inputs, run_lock,
                         write_atomic)
from .training import EventSink


def _ignore(_kind: str, _payload: dict) -> None:
    pass


@dataclass
class PreparedData:
    """Everything a run needs from its inputs, checked and tokenised, before any weights are loaded."""

    folder: object  # modeling.ModelFolder
    tokenizer: object
    train_files: list = field(default_factory=list)  # data.LoadedData, checked and counted; records not kept
    eval_files: list = field(default_factory=list)
    train: object = None  # data.TokenizedData
    eval: object = None
    scan: dict = field(default_factory=dict)  # personal-data / secrets counts (never the findings)


def prepare_inputs(recipe: Recipe, on_event: EventSink = _ignore, *, need_weights: bool = True) -> PreparedData:
    """Check the model folder, load and validate every data file, tokenise. Raises on the first bad input."""
    enforce_offline_env()
    from .data import iter_records, load_data_file, tokenize_records
    from .modeling import inspect_model_folder, load_tokenizer

    on_event("stage", {"text": "checking model folder"})
    if recipe.quantization is not None:  # refusals (fp16 on CPU, DoRA + 8-bit, no bitsandbytes) before any work
        from .modeling import check_quantization

        check_quantization(recipe.quantization, recipe.lora)
    from .distributed import check_fsdp

    if fsdp_note := check_fsdp(recipe.quantization):  # refuses QLoRA settings FSDP cannot shard
        on_event("warning", {"text": fsdp_note})
    folder = inspect_model_folder(recipe.model.path, allow_pickle=recipe.model.allow_pickle,
                                  need_weights=need_weights)
    if recipe.model.trust_remote_code:
        on_event("warning", {"text": "model.trust_remote_code is on: Python code shipped in the model folder "
                                     "will run on this machine."})
    tokenizer = load_tokenizer(folder, chat_template=recipe.data.chat_template,
                               trust_remote_code=recipe.model.trust_remote_code, of_record=recipe.data.tokenizer)

    on_event("stage", {"text": "loading and validating data"})
    prepared = PreparedData(folder=folder, tokenizer=tokenizer)
    # Each file is checked row by row and nothing is kept; then read again, one record at a time, into the scan
    # and the tokeniser together: no list of every record (or of every encoded row) is ever held.
    prepared.train_files = [load_data_file(f.path, f.format, split=f.split, keep_records=False)
                            for f in recipe.data.train]
    prepared.eval_files = [load_data_file(f.path, f.format, split=f.split, keep_records=False)
                           for f in recipe.data.eval]
    from .data.scan import ScanReport, scanned

    report = ScanReport()

    def tokenise(files):
        records = (record for loaded in files for _, record in
                   scanned(report, str(loaded.path), iter_records(loaded.path, loaded.format, loaded.split)))
        return tokenize_records(records, tokenizer, max_seq_len=recipe.train.max_seq_len,
                                overlong=recipe.data.overlong, train_on=recipe.data.train_on)

    on_event("stage", {"text": "scanning and tokenising"})
    prepared.train = tokenise(prepared.train_files)
    prepared.eval = tokenise(prepared.eval_files) if prepared.eval_files else None
    prepared.scan = _scan_summary(report, on_event)
    return prepared


def dry_run(recipe: Recipe, on_event: EventSink = _ignore) -> dict:
    """Validate recipe, model folder and data; count parameters on the meta device; train nothing."""
    from .modeling import lora_counts_without_weights

    # Weights are not needed to check a recipe: a config-only folder (config.json + tokenizer) plans a 7B run.
    prepared = prepare_inputs(recipe, on_event, need_weights=False)
    trainable, total = lora_counts_without_weights(prepared.folder, recipe.lora)
    return {
        "status": "dry-run",
        "recipe": recipe.model_dump(mode="json"),
        "recipe_digest": recipe.digest(),
        "model": {"path": str(prepared.folder.path), "architecture": prepared.folder.architecture,
                  "weight_files": [p.name for p in prepared.folder.weight_files]},
        "parameters": {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total},
        "data": _data_summary(prepared),
        "tokens": {"train": prepared.train.stats.as_dict(),
                   "eval": prepared.eval.stats.as_dict() if prepared.eval else None},
    }


def finetune(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
             on_event: EventSink = _ignore, sign_key: str | None = None) -> dict:
    """Train and publish one run; rank 0 holds the run's lock from the first check to the publish."""
    with ExitStack() as held:
        return _finetune(recipe, resume=resume, overwrite=overwrite, on_event=on_event, sign_key=sign_key,
                         held=held)


def quiet_deepspeed_on_cpu() -> None:
    """accelerate imports DeepSpeed whenever it is installed (unwrapping any model), and DeepSpeed then announces
    "Setting accelerator to CPU" on stdout; a single-process CPU run says so up front instead."""
    if world_size() <= 1 and "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _finetune(recipe: Recipe, *, resume: bool, overwrite: bool, on_event: EventSink, sign_key: str | None,
              held: ExitStack) -> dict:
    started_at, clock = _now(), time.monotonic()
    quiet_deepspeed_on_cpu()

    # 1. decide where the run goes, before any expensive work
    out_dir = Path(recipe.output.dir)
    work_dir = out_dir.with_name(out_dir.name + ".partial")
    main = is_main_process()
    sign_key = sign_key or recipe.output.sign_key  # the --sign-key flag wins over the recipe

    def check_everything():
        if main:  # inside the agreement, so every rank stops when another run holds the folder
            refuse_overlapping_inputs(recipe, out_dir, work_dir)  # before the lock file is created
            held.enter_context(run_lock(out_dir))
        checkpoint = check_targets(recipe, out_dir, work_dir, resume=resume, overwrite=overwrite, main=main)
        if sign_key and main:  # a wrong passphrase or a misplaced key must fail now, not after training
            from .keys import check_signing_key

            check_signing_key(Path(sign_key), outside=(out_dir, work_dir))
        # 2. model folder, data and tokens (all input errors surface here, before anything is written)
        return checkpoint, prepare_inputs(recipe, on_event)

    # Every rank checks its own inputs; if any rank fails, all stop now and rank 0 says why, once.
    # ...and must have found the same training settings, data bytes and checkpoint (paths may differ per node).
    checkpoint, prepared = all_ranks_agree(check_everything, fingerprint=lambda found: {
        "train settings": recipe.train.model_dump_json(), "lora settings": recipe.lora.model_dump_json(),
        "checkpoint": found[0].name if found[0] else None,
        "data sha256": [f.sha256 for f in found[1].train_files + found[1].eval_files]})
    if checkpoint is None and main:
        if resume:
            on_event("warning", {"text": f"no complete checkpoint in '{work_dir}' (the run was stopped before its "
                                         "first one was written): starting again from step 0"})
        shutil.rmtree(work_dir, ignore_errors=True)  # an unfinished run the user chose to --overwrite or --resume
        work_dir.mkdir(parents=True)

    # 3. base weights with LoRA attached; the seed fixes the adapter's initialisation
    enforce_offline_env()
    from transformers import set_seed

    from .distributed import is_sharded, place_for_training, trained_tensors, whole_root, zero3_partitioned
    from .evaluate import evaluation_loss, generate_reply
    from .manifest import digest_folder
    from .modeling import attach_lora, load_model, parameter_counts
    from .training import (build_trainer, check_resumable, checkpoint_step, checkpoints, is_complete, make_collator,
                           trim_metrics)

    on_event("stage", {"text": "hashing base model"})
    base_digests = digest_folder(prepared.folder.path)
    inputs = {"data": [[str(f.path), f.sha256] for f in prepared.train_files + prepared.eval_files],
              "base_model": base_digests}
    all_ranks_agree(lambda: check_same_inputs(work_dir / "inputs.json", inputs, resume=checkpoint is not None)
                    if main else None)
    on_event("stage", {"text": "loading base model"})
    set_seed(recipe.train.seed)
    base = load_model(prepared.folder, recipe.model, quantization=recipe.quantization,
                      gradient_checkpointing=recipe.train.gradient_checkpointing)
    model = place_for_training(attach_lora(base, recipe.lora))
    trainable, total = parameter_counts(model)

    # 4. where we start from: eval loss and a sample answer before training (rank 0's to report; the model is
    #    not sharded yet, so the other ranks need not wait for it)
    collator = make_collator(prepared.tokenizer)
    sample = _sample_conversation(prepared.eval_files or prepared.train_files)
    before = after = sample_before = None
    if prepared.eval is not None and main:
        on_event("stage", {"text": "evaluating before training"})
        before = evaluation_loss(model, prepared.eval.dataset, collator, batch_size=recipe.train.batch_size)
    if sample and main:
        sample_before = generate_reply(model, prepared.tokenizer, sample["prompt"])

    # 5. train (from the latest checkpoint when resuming)
    if main:
        write_atomic(work_dir / "recipe.yaml", recipe.to_yaml())
    if checkpoint is not None and main:
        for partial in checkpoints(work_dir / "checkpoints"):  # a kill mid-save: that step runs and saves again
            if not is_complete(partial):
                shutil.rmtree(partial, ignore_errors=True)
                on_event("warning", {"text": f"skipped {partial.name}: incomplete (the run was stopped while "
                                             "writing it)"})
            elif checkpoint_step(partial) > checkpoint_step(checkpoint):  # the Trainer rewrites it in place
                shutil.rmtree(partial, ignore_errors=True)
                on_event("warning", {"text": f"skipped {partial.name}: written at the run's last step; its last "
                                             f"steps run again from {checkpoint.name}"})
        trim_metrics(work_dir / "metrics.jsonl", checkpoint_step(checkpoint))
        on_event("stage", {"text": f"resuming from {checkpoint.name}"})
    trainer = build_trainer(model, prepared.tokenizer, prepared.train.dataset,
                            prepared.eval.dataset if prepared.eval else None, recipe.train, work_dir, on_event,
                            packing=recipe.data.packing)
    if checkpoint is not None:  # FSDP or not is known once the Trainer has its Accelerator; agree, report once
        all_ranks_agree(lambda: check_resumable(checkpoint, fsdp=trainer.is_fsdp_enabled))
    stop = _stop_at_step_boundary(trainer)
    with _first_ctrl_c_requests(stop):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    on_event("train_end", {})
    if stop["requested"]:
        stopped = Interrupted(f"interrupted at step {trainer.state.global_step}; a checkpoint was saved in "
                              f"'{work_dir / 'checkpoints'}'.", hint="Continue with the same command plus --resume.")
        stopped.exit_code = 128 + stop["signal"]  # 130 after Ctrl-C, 143 after SIGTERM, as shells report them
        raise stopped

    # 6. where we ended: eval loss and the same sample after training (every rank: under FSDP each forward pass
    #    gathers the shards of all ranks)
    if prepared.eval is not None:
        on_event("stage", {"text": "evaluating after training"})
        after = evaluation_loss(model, prepared.eval.dataset, collator, batch_size=recipe.train.batch_size)
    sharded = is_sharded(trainer.model_wrapped)
    if sample:
        with whole_root(trainer.model_wrapped):
            sample_after = generate_reply(model, prepared.tokenizer, sample["prompt"], synced_gpus=sharded or None)

    # 7. the adapter (plain PEFT format) and the run summary, then the atomic rename; under FSDP the adapter is
    #    gathered whole from the shards first (every rank takes part), so rank 0 saves all of it
    gathered = sharded or zero3_partitioned(model)  # model.state_dict() would hold shards: save the gathered ones
    adapter = trained_tensors(trainer.model_wrapped if sharded else model)
    weights_digest = _trainable_digest(adapter)
    if not main:  # the other ranks trained the same adapter; rank 0 alone writes and publishes it
        return {"status": "complete", "rank": int(os.environ.get("RANK", "0")), "name": recipe.name,
                "trainable_sha256": weights_digest}
    on_event("stage", {"text": "saving adapter"})
    model.save_pretrained(work_dir / "adapter", **({"state_dict": adapter} if gathered else {}))
    losses = [r["loss"] for r in _read_metrics(work_dir / "metrics.jsonl") if "loss" in r]
    summary = {
        "status": "complete",
        "name": recipe.name,
        "run_dir": str(out_dir),
        "adapter_dir": str(out_dir / "adapter"),
        "recipe_digest": recipe.digest(),
        "seed": recipe.train.seed,
        "base_model": {"path": str(prepared.folder.path), "architecture": prepared.folder.architecture,
                       "files": base_digests},
        "data": _data_summary(prepared),
        "tokens": {"train": prepared.train.stats.as_dict(),
                   "eval": prepared.eval.stats.as_dict() if prepared.eval else None},
        "parameters": {"trainable": trainable, "total": total, "trainable_sha256": weights_digest},
        "train": {
            "steps": trainer.state.global_step,
            "resumed_from_step": checkpoint_step(checkpoint) if checkpoint else None,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_loss": output.training_loss,
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "runtime_s": output.metrics.get("train_runtime"),
            "processes": world_size(),
            "fsdp": sharded,  # False when accelerate ran an FSDP launch as DDP (on CPU)
        },
        "eval": {"before": before, "after": after},
        "sample": {**sample, "before": sample_before, "after": sample_after} if sample else None,
        "versions": environment_versions(),
        "started_at": started_at,
        "finished_at": _now(),
        "wall_time_s": round(time.monotonic() - clock, 2),
    }
    # 8. provenance inside the adapter, then the signature over all of it (adapter.sig beside adapter/); both
    #    before the rename, so nothing signed-looking is ever published for an unfinished run
    from .manifest import describe_folder
    from .provenance import write_provenance
    from .signing import sign_folder

    on_event("stage", {"text": "writing provenance" + (" and signing" if sign_key else "")})
    write_provenance(work_dir / "adapter", {**summary, "recipe": recipe.model_dump(mode="json")})
    summary["signature"] = None
    if sign_key:
        signed = sign_folder(work_dir / "adapter", Path(sign_key), sig_path=work_dir / "adapter.sig")
        summary["signature"] = {"path": str(out_dir / "adapter.sig"), "key_hint": signed["key_hint"]}
        summary["adapter_digest"] = signed["subject_digest"]
    else:
        summary["adapter_digest"] = describe_folder(work_dir / "adapter")["subject_digest"]
    summary["loss_plot"] = _loss_plot(work_dir, out_dir, summary, on_event)
    (work_dir / "run.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    publish(work_dir, out_dir)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # after: a kill before the publish can still resume
    return summary


def _loss_plot(work_dir: Path, out_dir: Path, summary: dict, on_event: EventSink) -> str | None:
    """loss.png beside run.json. A picture is not worth a finished run: failing to draw it is a warning."""
    from .loss_plot import write_loss_plot

    evals = summary["eval"]
    try:
        write_loss_plot(work_dir / "loss.png", _read_metrics(work_dir / "metrics.jsonl"),
                        eval_before=(evals["before"] or {}).get("loss"), eval_after=(evals["after"] or {}).get("loss"),
                        final_step=summary["train"]["steps"], title=f"{summary['name']}: loss and learning rate")
    except Exception as exc:  # noqa: BLE001 - matplotlib can fail in many ways (fonts, cache dir); none matter here
        on_event("warning", {"text": f"loss.png was not drawn: {type(exc).__name__}: {exc}"})
        return None
    return str(out_dir / "loss.png")


def _trainable_digest(tensors: dict) -> str:
    """sha256 over the trained (LoRA) tensors in name order: equal on every rank of a correct DDP or FSDP run."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def _data_summary(prepared: PreparedData) -> dict:
    def files(loaded):
        return [{"path": str(f.path), "format": f.format, "rows": f.rows, "sha256": f.sha256} for f in loaded]

    return {"train": files(prepared.train_files), "eval": files(prepared.eval_files), "scan": prepared.scan}


def _scan_summary(report, on_event: EventSink) -> dict:
    """Warn about likely personal data and secrets found in what will be trained on; keep only the counts."""
    if report.counts:
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts.items()))
        on_event("warning", {"text": f"the training data contains likely personal data or secrets ({found}); "
                                     "see `msov data scan`"})
    return report.summary()


def _sample_conversation(files) -> dict | None:
    """The first conversation of the held-out data, cut before its last answer: the demo's before/after probe.
    Files are read again only up to that conversation (completion files hold none)."""
    from .data import iter_records

    for loaded in files:
        if loaded.format == "completion":
            continue
        records = loaded.records or (record for _, record in iter_records(loaded.path, loaded.format, loaded.split))
        for record in records:
            messages = record.get("messages")
            if messages and messages[-1]["role"] == "assistant":
                return {"prompt": messages[:-1], "reference": messages[-1]["content"]}
    return None


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"msov": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


__all__ = ["dry_run", "finetune", "load_recipe", "prepare_inputs", "environment_versions"]
