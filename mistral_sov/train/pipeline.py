"""`msov finetune`: the whole run as a list of stages, from a validated recipe to a finished run folder.

The run is built in `<output.dir>.partial/` (checkpoints, metrics.jsonl, resolved recipe) and renamed to
`<output.dir>/` only after the adapter and run.json are written, so a crash never leaves a folder that looks done.
Each stage takes what it needs and hands on a small typed result: the run's Target, the PreparedData, the
LoadedModel, Measured (before and after), trainer.Trained, engine.GatheredAdapter, the RunRecord.
"""

from __future__ import annotations

import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from .. import __version__
from ..events import EventSink, no_events
from ..guard.env import enforce_offline_env
from ..recipe import Recipe
from ..record import (AdapterRef, BaseModelRef, ComputeRecord, Controls, DataRefs, EgressControl, EvalRefs,
                      EvalResult, Parameters, RankResult, RunRecord, Sample, ScanControl, TokenRefs, TrainResult)
from .engine import Engine, quiet_deepspeed_on_cpu
from .finish import draw_loss_plot, publish, seal_adapter
from .preference import PREFERENCE_METHODS, REFERENCE_ADAPTER, drop_reference
from .ranks import all_ranks_agree
from .run_folder import (Target, check_targets, ready_to_train, record_inputs, refuse_overlapping_inputs, run_lock,
                         start_afresh)
from .trainer import Trained, train


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
    start_adapter: object = None  # model.adapter's folder (a Path), checked; None: training starts a fresh adapter
    # what was done about the findings: finetune warns and trains on the data as given (no --fail-on, no redaction)
    scan_policy: dict = field(default_factory=lambda: {"action": "warn", "fail_on": [], "redact": False})


def prepare_inputs(recipe: Recipe, on_event: EventSink = no_events, *, need_weights: bool = True) -> PreparedData:
    """Check the model folder, load and validate every data file, tokenise. Raises on the first bad input."""
    enforce_offline_env()
    from ..data import iter_records, tokenize_records
    from ..model.load import inspect_model_folder, load_tokenizer

    on_event("stage", {"text": "checking model folder"})
    if recipe.quantization is not None:  # refusals (fp16 on CPU, DoRA + 8-bit, no bitsandbytes) before any work
        from ..model.load import check_quantization

        check_quantization(recipe.quantization, recipe.lora)
    from .engine import check_fsdp

    if fsdp_note := check_fsdp(recipe.quantization):  # refuses QLoRA settings FSDP cannot shard
        on_event("warning", {"text": fsdp_note})
    folder = inspect_model_folder(recipe.model.path, allow_pickle=recipe.model.allow_pickle,
                                  need_weights=need_weights)
    if recipe.model.trust_remote_code:
        on_event("warning", {"text": "model.trust_remote_code is on: Python code shipped in the model folder "
                                     "will run on this machine."})
    tokenizer = load_tokenizer(folder, chat_template=recipe.data.chat_template,
                               trust_remote_code=recipe.model.trust_remote_code, of_record=recipe.data.tokenizer)
    start_adapter = None
    if recipe.model.adapter:
        from ..model.start_adapter import inspect_start_adapter

        start_adapter = inspect_start_adapter(recipe.model.adapter, recipe.lora, architecture=folder.architecture)

    on_event("stage", {"text": "loading and validating data"})
    prepared = PreparedData(folder=folder, tokenizer=tokenizer, start_adapter=start_adapter)
    # Each file is checked row by row and nothing is kept; then read again, one record at a time, into the scan
    # and the tokeniser together: no list of every record (or of every encoded row) is ever held.
    prepared.train_files = [_load_for(recipe, f) for f in recipe.data.train]
    prepared.eval_files = [_load_for(recipe, f) for f in recipe.data.eval]
    from ..data.scan import ScanReport, scanned

    report = ScanReport()

    def tokenise(files):
        records = (record for loaded in files for _, record in
                   scanned(report, str(loaded.path), iter_records(loaded.path, loaded.format, loaded.split)))
        return tokenize_records(records, tokenizer, max_seq_len=recipe.train.max_seq_len,
                                overlong=recipe.data.overlong, train_on=recipe.data.train_on,
                                preference=recipe.train.method in PREFERENCE_METHODS)

    on_event("stage", {"text": "scanning and tokenising"})
    prepared.train = tokenise(prepared.train_files)
    prepared.eval = tokenise(prepared.eval_files) if prepared.eval_files else None
    prepared.scan = _scan_summary(report, on_event)
    return prepared


def _load_for(recipe: Recipe, data_file):
    """A data file checked for the run's method: SFT formats for sft, preference pairs for dpo and orpo."""
    from ..data import load_data_file
    from ..errors import DataError

    pairs = recipe.train.method in PREFERENCE_METHODS
    loaded = load_data_file(data_file.path, data_file.format, split=data_file.split, keep_records=False, sft=not pairs)
    if pairs and loaded.format != "preference":
        raise DataError(f"{loaded.path}: {loaded.format} format, but train.method: {recipe.train.method} learns from "
                        "preference pairs",
                        hint="Give a file of prompt + chosen + rejected rows (or messages + chosen + rejected "
                             "assistant turns), or set train.method: sft.")
    return loaded


def effective_packing(recipe: Recipe) -> bool:
    """Packing is for SFT only: a DPO or ORPO batch must hold each pair's chosen and rejected rows side by side,
    each row's log-probability summed on its own, and the reference pass over the very same rows."""
    return recipe.data.packing and recipe.train.method == "sft"


def dry_run(recipe: Recipe, on_event: EventSink = no_events) -> dict:
    """Validate recipe, model folder and data; count parameters on the meta device; train nothing."""
    from ..model.load import lora_counts_without_weights

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


def finetune(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, on_event: EventSink = no_events,
             sign_key: str | None = None) -> RunRecord | RankResult:
    """Train and publish one run. Rank 0 returns the run's record, having held the run's lock from the first check
    to the publish; every other rank returns what it trained (rank 0 alone writes)."""
    from ..guard.egress import refusals_mark

    started_at, clock = _now(), time.monotonic()
    egress = refusals_mark()  # the run's record reports what the guard refused from here on
    quiet_deepspeed_on_cpu()
    engine = Engine.from_environment()
    sign_key = sign_key or recipe.output.sign_key  # the --sign-key flag wins over the recipe
    with ExitStack() as lock:
        # 1. where the run goes, the model folder, data and tokens: every input error surfaces here, on every rank,
        #    before anything is written
        target, prepared = check_run(recipe, engine, lock, resume=resume, overwrite=overwrite, sign_key=sign_key,
                                     on_event=on_event)
        # 2. the bytes trained on: recorded in inputs.json, or, on resume, checked against it
        base_files, start_files = record_inputs(target, prepared.folder.path, prepared.train_files
                                                + prepared.eval_files, main=engine.is_main, on_event=on_event,
                                                start_adapter=prepared.start_adapter)
        # 3. base weights with LoRA attached (fresh: the seed fixes its initialisation; or model.adapter's)
        loaded = load_for_training(recipe, prepared, engine, on_event)
        # 4. where we start from: eval loss and a sample answer (rank 0's to report; nothing is sharded yet)
        sample = sample_conversation(prepared.eval_files or prepared.train_files)
        before = measure(loaded.model, prepared, recipe, sample, engine, on_event)
        # 5. train, from the latest usable checkpoint when resuming
        earlier_metrics = ready_to_train(target, recipe, on_event) if engine.is_main else []
        train_rows, eval_rows = reference_ready(loaded.model, prepared, recipe, on_event)
        trained = train(loaded.model, prepared.tokenizer, train_rows, eval_rows, recipe.train,
                        target.work_dir, on_event, packing=effective_packing(recipe), resume_from=target.checkpoint,
                        earlier_metrics=earlier_metrics)
        # 6. where we ended: the same measures, on every rank (under FSDP each forward pass gathers all shards)
        after = measure(loaded.model, prepared, recipe, sample, engine, on_event, trained=trained)
        drop_reference(loaded.model)  # a start adapter's frozen copy: the DPO reference, not part of the result
        # 7. the adapter, gathered whole by every rank; rank 0 alone saves and publishes it
        adapter = engine.gather_adapter(trained.model_wrapped, loaded.model)
        if not engine.is_main:
            return RankResult(rank=engine.rank, name=recipe.name, trainable_sha256=adapter.sha256)
        on_event("stage", {"text": "saving adapter"})
        adapter.save(loaded.model, target.work_dir / "adapter")
        # 8. the run's record, then provenance and signature over adapter/, and loss.png
        record = describe_run(recipe, target, prepared, base_files, loaded, adapter.sha256, trained,
                              engine, before, after, sample, started_at=started_at, clock=clock, egress=egress,
                              start_files=start_files)
        record = seal_adapter(record, recipe, target, sign_key, on_event)
        record = draw_loss_plot(record, trained.metrics, target, on_event)
        # 9. run.json, the atomic rename of OUT.partial/ to OUT/, checkpoints removed
        publish(record, target)
        return record


@dataclass
class LoadedModel:
    model: object  # the PEFT model, placed on this rank's device
    trainable: int  # counted before training: a sharded model would count its shards only
    total: int


@dataclass
class Measured:
    """Held-out loss and the sample's reply at one point of the run (None where nothing was measured)."""

    eval: EvalResult | None = None
    reply: str | None = None


def check_run(recipe: Recipe, engine: Engine, lock: ExitStack, *, resume: bool, overwrite: bool,
              sign_key: str | None, on_event: EventSink) -> tuple[Target, PreparedData]:
    """Every rank checks its own inputs; if any rank fails, all stop now and rank 0 says why, once. All must have
    found the same training settings, data bytes and checkpoint (paths may differ per node). Rank 0 enters the
    run's lock into `lock`. (prepare_inputs sets the offline environment before anything imports transformers.)"""
    where, main = Target.of(recipe), engine.is_main

    def check_everything():
        if main:  # inside the agreement, so every rank stops when another run holds the folder
            refuse_overlapping_inputs(recipe, where.out_dir, where.work_dir)  # before the lock file is created
            lock.enter_context(run_lock(where.out_dir))
        checkpoint = check_targets(recipe, where.out_dir, where.work_dir, resume=resume, overwrite=overwrite,
                                   main=main)
        if sign_key and main:  # a wrong passphrase or a misplaced key must fail now, not after training
            from ..trust.signer import check_signer

            check_signer(sign_key, outside=(where.out_dir, where.work_dir))
        return replace(where, checkpoint=checkpoint), prepare_inputs(recipe, on_event)

    target, prepared = all_ranks_agree(check_everything, fingerprint=lambda found: {
        "train settings": recipe.train.model_dump_json(), "lora settings": recipe.lora.model_dump_json(),
        "checkpoint": found[0].checkpoint.name if found[0].checkpoint else None,
        "data sha256": [f.sha256 for f in found[1].train_files + found[1].eval_files]})
    if target.checkpoint is None and main:
        start_afresh(target, resume=resume, on_event=on_event)
    return target, prepared


def load_for_training(recipe: Recipe, prepared: PreparedData, engine: Engine, on_event: EventSink) -> LoadedModel:
    from transformers import set_seed

    from ..model.load import attach_lora, load_model, parameter_counts

    on_event("stage", {"text": "loading base model"})
    set_seed(recipe.train.seed)
    base = load_model(prepared.folder, recipe.model, quantization=recipe.quantization,
                      gradient_checkpointing=recipe.train.gradient_checkpointing, fsdp=engine.fsdp)
    # DPO from an adapter: its reference is that adapter (the SFT model), loaded a second time and frozen
    reference = REFERENCE_ADAPTER if prepared.start_adapter and recipe.train.method == "dpo" else None
    model = engine.place(attach_lora(base, recipe.lora, start=prepared.start_adapter, reference=reference))
    # counted without the reference copy: a run from model.adapter reports the same parameters as a fresh one
    trainable, total = parameter_counts(model)
    return LoadedModel(model, trainable, total - (_adapter_size(model, reference) if reference else 0))


def _adapter_size(model, name: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n)


def reference_ready(model, prepared: PreparedData, recipe: Recipe, on_event: EventSink) -> tuple:
    """The train and eval datasets as training takes them: with train.precompute_ref, each pair carries its
    reference log-probabilities, computed here once (before any weight changes: the base's with the adapter off,
    or, from model.adapter, its frozen reference copy's)."""
    train_rows, eval_rows = prepared.train.dataset, prepared.eval.dataset if prepared.eval else None
    if recipe.train.method != "dpo" or not recipe.train.precompute_ref:  # ORPO has no reference
        return train_rows, eval_rows
    from .preference import with_reference_logps

    on_event("stage", {"text": "computing the reference log-probabilities"})
    settings = {"pad_token_id": prepared.tokenizer.pad_token_id, "batch_size": recipe.train.batch_size}
    return (with_reference_logps(model, train_rows, **settings),
            with_reference_logps(model, eval_rows, **settings) if eval_rows is not None else None)


def measure(model, prepared: PreparedData, recipe: Recipe, sample: dict | None, engine: Engine,
            on_event: EventSink, *, trained: Trained | None = None) -> Measured:
    """Held-out loss and the sample's reply. Before training (no `trained` yet) rank 0's alone, for the report:
    nothing is sharded yet. After it every rank takes part: under FSDP each forward pass gathers all shards."""
    from ..evaluate import evaluation_loss, generate_reply
    from .trainer import make_collator

    measured = Measured()
    if trained is None and not engine.is_main:
        return measured
    if prepared.eval is not None and recipe.train.method in PREFERENCE_METHODS:
        from .preference import preference_evaluation

        on_event("stage", {"text": f"evaluating {'after' if trained else 'before'} training"})
        settings = recipe.train
        measured.eval = EvalResult(**preference_evaluation(
            model, prepared.eval.dataset, pad_token_id=prepared.tokenizer.pad_token_id, beta=settings.beta,
            loss_type=settings.loss_type, label_smoothing=settings.label_smoothing, batch_size=settings.batch_size,
            method=settings.method))
    elif prepared.eval is not None:
        on_event("stage", {"text": f"evaluating {'after' if trained else 'before'} training"})
        measured.eval = EvalResult(**evaluation_loss(model, prepared.eval.dataset, make_collator(prepared.tokenizer),
                                                     batch_size=recipe.train.batch_size))
    if sample:
        wrapped = trained.model_wrapped if trained else None
        with engine.generation_context(wrapped):
            measured.reply = generate_reply(model, prepared.tokenizer, sample["prompt"],
                                            synced_gpus=engine.sharded(wrapped) or None)
    return measured


def describe_run(recipe: Recipe, target: Target, prepared: PreparedData, base_files: dict[str, str],
                 loaded: LoadedModel, trainable_sha256: str, trained: Trained, engine: Engine, before: Measured,
                 after: Measured, sample: dict | None, *, started_at: str, clock: float,
                 egress: object = None, start_files: dict[str, str] | None = None) -> RunRecord:
    """The record of the run as trained. Its adapter digest (and signature) come once the adapter folder is final
    (finish.seal_adapter): until then the digest is empty."""
    from .checkpoints import checkpoint_step

    losses = trained.losses
    return RunRecord(
        name=recipe.name, run_dir=str(target.out_dir), adapter_dir=str(target.out_dir / "adapter"),
        recipe_digest=recipe.digest(), seed=recipe.train.seed,
        base_model=BaseModelRef(path=str(prepared.folder.path), architecture=prepared.folder.architecture,
                                files=base_files),
        start_adapter=AdapterRef(path=str(prepared.start_adapter), files=start_files or {})
        if prepared.start_adapter else None,
        data=DataRefs.model_validate(_data_summary(prepared)),
        tokens=TokenRefs(train=prepared.train.stats, eval=prepared.eval.stats if prepared.eval else None),
        parameters=Parameters(trainable=loaded.trainable, total=loaded.total, trainable_sha256=trainable_sha256),
        train=TrainResult(
            steps=trained.steps, resumed_from_step=checkpoint_step(target.checkpoint) if target.checkpoint else None,
            first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
            train_loss=trained.train_loss, tokens_seen=trained.tokens_seen, runtime_s=trained.runtime_s,
            processes=engine.processes, fsdp=engine.sharded(trained.model_wrapped)),
        eval=EvalRefs(before=before.eval, after=after.eval),
        sample=Sample(**sample, before=before.reply, after=after.reply) if sample else None,
        versions=environment_versions(), started_at=started_at, finished_at=_now(),
        wall_time_s=round(time.monotonic() - clock, 2), adapter_digest="",
        compute=measure_compute(recipe, prepared, loaded, trained),
        controls=controls_that_ran(recipe, prepared, egress))


def measure_compute(recipe: Recipe, prepared: PreparedData, loaded: LoadedModel, trained: Trained) -> ComputeRecord:
    """Model FLOPs spent on the tokens the Trainer processed (all ranks, every step, a resumed run's earlier
    steps too), counted as model/compute.py states; the split into supervised tokens and attention pairs is the
    training data's, scaled to the tokens processed (the Trainer counts tokens only)."""
    from ..model.compute import (FORMULA, FORMULA_WITHOUT_SHAPE, THRESHOLD, ModelShape, training_flops,
                                 training_flops_without_shape)

    tokens, stats = int(trained.tokens_seen or 0), prepared.train.stats
    supervised = round(tokens * stats.supervised_tokens / max(stats.tokens, 1))
    pairs = round(tokens * _causal_pairs(prepared.train.dataset) / max(stats.tokens, 1))
    shape = ModelShape.from_config(prepared.folder.config)
    if shape is None:
        flops = training_flops_without_shape(total=loaded.total, trainable=loaded.trainable, tokens=tokens)
    else:
        flops = training_flops(shape, trainable=loaded.trainable, tokens=tokens, supervised=supervised,
                               attention_pairs=pairs)
    base = recipe.model.base_training_flops
    ratio = flops / base if base else None
    return ComputeRecord(
        flops=flops, tokens_processed=tokens, supervised_tokens=supervised, attention_pairs=pairs,
        total_parameters=loaded.total, trainable_parameters=loaded.trainable,
        frozen_matmul_parameters=shape.frozen_matmul if shape else None,
        lm_head_parameters=shape.lm_head if shape else None, attention_width=shape.attention_width if shape else None,
        formula=FORMULA if shape else FORMULA_WITHOUT_SHAPE, base_training_flops=base, ratio=ratio,
        threshold=THRESHOLD, above_threshold=ratio > THRESHOLD if ratio is not None else None)


def _causal_pairs(dataset) -> int:
    """Σ L·(L+1)/2 over the dataset's rows: the query-key pairs causal attention computes within each row."""
    import pyarrow.compute as pc

    total = 0
    for column in dataset.column_names:  # input_ids; chosen_input_ids and rejected_input_ids for preference pairs
        if column.endswith("input_ids"):
            lengths = pc.list_value_length(dataset.data.column(column)).to_numpy().astype("int64")
            total += int((lengths * (lengths + 1) // 2).sum())
    return total


def controls_that_ran(recipe: Recipe, prepared: PreparedData, egress: object) -> Controls:
    """What the run's controls did, read back from them: the guard's refusals since the run began, the offline
    variables as the process holds them, the scan policy applied and its counts, the seed."""
    from ..guard.egress import refusals_since
    from ..guard.env import offline_env_in_force

    return Controls(egress_guard=EgressControl(**refusals_since(egress)), offline_env=offline_env_in_force(),
                    scan=ScanControl(**prepared.scan_policy, **prepared.scan), seed=recipe.train.seed)


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


def sample_conversation(files) -> dict | None:
    """The first conversation of the held-out data, cut before its last answer: the demo's before/after probe.
    Files are read again only up to that conversation (completion files hold none)."""
    from ..data import iter_records

    for loaded in files:
        if loaded.format == "completion":
            continue
        records = loaded.records or (record for _, record in iter_records(loaded.path, loaded.format, loaded.split))
        for record in records:
            if "chosen" in record:  # a preference pair: its prompt, and the chosen answer as the reference
                from ..data import preference_conversations

                record = preference_conversations(record)[0]
            messages = record.get("messages")
            if messages and messages[-1]["role"] == "assistant":
                return {"prompt": messages[:-1], "reference": messages[-1]["content"]}
    return None


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


# quiet_deepspeed_on_cpu (train/engine.py) is listed for the CLI, which calls it before anything imports accelerate
__all__ = ["dry_run", "environment_versions", "finetune", "prepare_inputs", "quiet_deepspeed_on_cpu"]
