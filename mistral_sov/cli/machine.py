"""Commands about the machine and its tools: `msov version`, `plan` (will a recipe fit?), `doctor` (can this
machine run msov?), `tiny-model` (a local model for tests, demos and benches)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import MsovError
from . import show
from .base import JsonOpt, RecipeArg, SetOpt, command, emit

NOT_FIT_EXIT = 3  # the recipe, as written, is bad input for the memory it was planned against


@command()
def version(as_json: bool = JsonOpt) -> None:
    """Print msov's version and the versions of the libraries it runs on."""
    from ..train.pipeline import environment_versions

    emit(environment_versions(), show.print_versions)


@command(name="tiny-model")
def tiny_model(
    out: Path = typer.Argument(..., help="folder to create"),
    seed: int = typer.Option(0, help="initialisation seed (same seed, same files)"),
    data_dir: Optional[Path] = typer.Option(None, help="text to train the tokenizer on (default: data_samples/)"),
    as_json: bool = JsonOpt,
) -> None:
    """Build a tiny random-init Mistral model and tokenizer locally (for tests, demos, benches)."""
    from ..tools.tiny import build_tiny_model
    from ..trust.hashing import digest_folder

    try:
        build_tiny_model(out, seed=seed, data_dir=data_dir)
    except FileExistsError as exc:
        raise MsovError(str(exc), hint="choose a new folder") from None
    emit({"status": "ok", "path": str(out), "files": digest_folder(out)}, show.print_digests)


@command()
def plan(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="memory to plan for, e.g. 24GiB (GiB = 2^30 bytes, GB = 10^9); "
                                          "default: this machine's first GPU, else its available RAM"),
    max_seq_len_for: Optional[str] = typer.Option(
        None, "--max-seq-len-for", metavar="GPU_MEM", help="answer instead: the longest train.max_seq_len this "
        "recipe trains in GPU_MEM (e.g. 12GiB), and what each cheaper change would make it"),
    as_json: bool = JsonOpt,
) -> None:
    """Estimate a recipe's peak training memory from config.json alone (no weights) and say whether it fits.

    Exit 0 when it fits, 3 when it does not (the output names the cheapest change that makes it fit). With
    --max-seq-len-for: exit 0 with the longest sequence that fits, 3 when not even 256 tokens do.
    """
    from ..model.memory import plan_max_seq_len, plan_recipe
    from ..recipe import load_recipe

    if max_seq_len_for is not None:
        if gpu_mem is not None:
            raise typer.BadParameter("give --gpu-mem or --max-seq-len-for, not both", param_hint="--gpu-mem")
        report = plan_max_seq_len(load_recipe(recipe, overrides), gpu_mem=max_seq_len_for)
        emit(report, show.print_max_seq_len)
        if not report["longest"]["max_seq_len"]:
            raise typer.Exit(NOT_FIT_EXIT)
        return
    report = plan_recipe(load_recipe(recipe, overrides), gpu_mem=gpu_mem)
    emit(report, show.print_plan)
    if report["verdict"] != "fits":
        raise typer.Exit(NOT_FIT_EXIT)


@command()
def doctor(
    out: Path = typer.Option(Path("runs"), "--out", help="output folder to check for write access and free disk"),
    as_json: bool = JsonOpt,
) -> None:
    """Check whether this machine can run msov offline: versions, torch build, bitsandbytes, disk, memory, network.

    Exit 0 when every required check passes, 5 when one fails (warnings do not fail).
    """
    from ..errors import EnvironmentRefused
    from ..tools.doctor import run_checks

    report = run_checks(out)
    emit(report, show.print_doctor)
    if not report["ok"]:
        raise typer.Exit(EnvironmentRefused.exit_code)
