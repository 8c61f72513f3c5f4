"""`msov finetune` and `msov demo`: train a LoRA adapter as a recipe says, with a progress bar on rank 0."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from . import show
from .base import JsonOpt, RecipeArg, SetOpt, command, console, emit, events, stage_printer, warn_if_pin_in_argv

if TYPE_CHECKING:
    from ..record import RunRecord


@command()
def finetune(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="validate recipe, model and data; train nothing"),
    resume: bool = typer.Option(False, "--resume", help="continue the unfinished run from its latest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run at output.dir"),
    sign_key: Optional[str] = typer.Option(None, "--sign-key", help="sign the adapter with this private key "
                                           "(overrides output.sign_key; passphrase from $MSOV_KEY_PASSPHRASE), or "
                                           "an HSM key: pkcs11:token=...;object=..."),
    base_training_flops: Optional[str] = typer.Option(None, "--base-training-flops", metavar="FLOPS",
                                                      help="the base model's pre-training compute, e.g. 2.5e24 "
                                                      "(overrides model.base_training_flops): the run records its "
                                                      "share of it"),
    as_json: bool = JsonOpt,
) -> None:
    """Fine-tune a local model with LoRA as the recipe says; write adapter/, metrics.jsonl and run.json."""
    from ..errors import Interrupted
    from ..recipe import load_recipe
    from ..record import RunRecord

    loaded = load_recipe(recipe, overrides)
    if base_training_flops is not None:
        loaded.model.base_training_flops = _positive_flops(base_training_flops)
    if dry_run:
        from ..train.pipeline import dry_run as run_dry

        report = run_dry(loaded, on_event=events(as_json))
        emit(report, lambda screen, r: show.print_dry_run(screen, r, loaded))
        return
    warn_if_pin_in_argv(sign_key)
    try:
        result = _run_with_progress(loaded, resume=resume, overwrite=overwrite, quiet=as_json,
                                    sign_key=sign_key or None)
    except Interrupted as exc:
        sets = "".join(f" --set {o}" for o in overrides or [])
        exc.hint = f"continue with: msov finetune {recipe}{sets} --resume"
        raise
    if isinstance(result, RunRecord):  # a rank other than 0 of a multi-process run returns less: rank 0 reports
        emit(result, show.print_run_summary)


@dataclass
class DemoResult:
    """The demo's run and its whole wall time (the tiny model's build included)."""

    record: RunRecord
    wall_time_s: float

    def to_json(self) -> dict:
        return {**self.record.to_json(), "demo_wall_time_s": self.wall_time_s}


@command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the tiny model and the run go"),
    as_json: bool = JsonOpt,
) -> None:
    """Build the embedded tiny model, fine-tune it on the sample data, show before/after."""
    from ..recipe import load_recipe
    from ..tools.tiny import DEMO_RECIPE, build_tiny_model
    from ..train.pipeline import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()
    started = time.monotonic()
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        if not as_json:
            console().print(f"[dim]building tiny model in {model_dir}[/]")
        build_tiny_model(model_dir)
    loaded = load_recipe(DEMO_RECIPE, [f"model.path={model_dir.resolve()}", f"output.dir={(out / 'run').resolve()}"])
    record = _run_with_progress(loaded, resume=False, overwrite=True, quiet=as_json)
    emit(DemoResult(record, round(time.monotonic() - started, 2)), show.print_demo)


def _positive_flops(text: str) -> float:
    import math

    from ..errors import UsageError

    try:
        value = float(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise UsageError(f"--base-training-flops: {text!r} is not a positive number of FLOPs; write it as e.g. 2.5e24 "
                         "(the base model's pre-training compute, as its provider states it).")
    return value


def _run_with_progress(recipe, *, resume: bool, overwrite: bool, quiet: bool, sign_key: str | None = None):
    """The run's RunRecord on rank 0 (a RankResult on the others), with one progress bar per run: rank 0's."""
    from ..events import no_events
    from ..train.pipeline import finetune as run_finetune
    from ..train.ranks import is_main_process

    if quiet or not is_main_process():
        return run_finetune(recipe, resume=resume, overwrite=overwrite, on_event=no_events, sign_key=sign_key)
    with show.TrainingProgress(console(), stage_printer()) as progress:
        return run_finetune(recipe, resume=resume, overwrite=overwrite, on_event=progress.on_event,
                            sign_key=sign_key)
