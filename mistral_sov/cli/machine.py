"""CLI commands about the machine: `msov plan` (will a recipe fit?) and `msov doctor` (can this machine run msov?).

Registered on the main Typer app in cli.py. Heavy imports inside commands only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from . import JsonOpt, RecipeArg, SetOpt, _console, app, command  # noqa: F401

GiB = 1024**3
NOT_FIT_EXIT = 3  # the recipe, as written, is bad input for the memory it was planned against


@command()
def plan(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="memory to plan for, e.g. 24GB (GB = GiB); "
                                          "default: this machine's first GPU, else its available RAM"),
    as_json: bool = JsonOpt,
) -> None:
    """Estimate a recipe's peak training memory from config.json alone (no weights) and say whether it fits.

    Exit 0 when it fits, 3 when it does not (the output names the cheapest change that makes it fit).
    """
    from ..model.memory import plan_recipe
    from ..recipe import load_recipe

    report = plan_recipe(load_recipe(recipe, overrides), gpu_mem=gpu_mem)
    if as_json:
        print(json.dumps(report))
    else:
        _print_plan(report)
    if report["verdict"] != "fits":
        raise typer.Exit(NOT_FIT_EXIT)


def _gib(value: int) -> str:
    return f"{value / GiB:,.2f} GiB"


def _print_plan(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console(stderr=False)
    m, p, s = report["model"], report["parameters"], report["settings"]
    experts = f", {m['experts']} experts (top-{m['experts_per_token']})" if m["experts"] > 1 else ""
    console.print(f"model          {escape(m['path'])} ({m['architecture']}: {m['layers']} layers, hidden "
                  f"{m['hidden']}, vocab {m['vocab']}{experts})")
    console.print(f"parameters     {p['total']:,} total; {p['trainable']:,} trainable "
                  f"({100 * p['trainable'] / p['total']:.3f}%)")
    if p["quantized"]:
        console.print(f"quantized      {p['quantized']:,} in nn.Linear layers; {p['not_quantized']:,} stay "
                      "unquantized (embeddings, norms, output head, fused MoE experts) and are held in fp32")
    console.print(f"settings       {s['quantization']}; batch {s['batch_size']} x {s['max_seq_len']} tokens; "
                  f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; {s['optimizer']}")
    mem = report["memory"]
    table = Table(show_edge=False, title="estimated peak memory of one training step")
    table.add_column("part")
    table.add_column("memory", justify="right")
    rows = [("base weights", "weights"), ("LoRA weights", "lora"), ("gradients", "gradients"),
            ("optimizer states", "optimizer"), ("activations", "activations"), ("loss over the vocabulary", "logits"),
            ("backward workspace", "workspace"), ("CUDA context + allocator slack", "runtime_overhead")]
    for label, key in rows:
        table.add_row(label, _gib(mem[key]))
    table.add_row("[bold]total[/]", f"[bold]{_gib(mem['total'])}[/]")
    console.print(table)
    console.print(f"activations    {_gib(mem['activations_without_checkpointing'])} without gradient checkpointing, "
                  f"{_gib(mem['activations_with_checkpointing'])} with it")
    budget = report["budget"]
    if report["verdict"] == "fits":
        console.print(f"[bold green]fits[/] in {_gib(budget['bytes'])} ({escape(budget['source'])}), "
                      f"{_gib(report['headroom'])} to spare")
        return
    console.print(f"[bold red]does not fit[/] in {_gib(budget['bytes'])} ({escape(budget['source'])}): "
                  f"{_gib(-report['headroom'])} short")
    fix = report["suggestion"]
    if fix:
        sets = " ".join(f"--set {item}" for item in fix["set"])
        console.print(f"cheapest fix   {escape(fix['change'])} -> {_gib(fix['estimated'])}")
        console.print(f"               {escape(sets)}")
    else:
        console.print("no recipe change makes it fit: the base weights alone need "
                      f"{_gib(mem['weights'])}; use a GPU with more memory or shard the model across GPUs (FSDP)")


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
    if as_json:
        print(json.dumps(report))
    else:
        _print_doctor(report)
    if not report["ok"]:
        raise typer.Exit(EnvironmentRefused.exit_code)


def _print_doctor(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console(stderr=False)
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}
    table = Table(show_edge=False, title="msov doctor", title_justify="left")
    table.add_column("check")
    table.add_column("")
    table.add_column("detail", overflow="fold")
    for check in report["checks"]:
        table.add_row(check["name"], marks[check["status"]], escape(check["detail"]))
    console.print(table)
    if report["ok"]:
        warned = f" ({len(report['warnings'])} warning{'s' * (len(report['warnings']) != 1)})" \
            if report["warnings"] else ""
        console.print(f"[bold green]ready[/]: this machine can run msov offline{warned}.")
    else:
        console.print(f"[bold red]not ready[/]: required check(s) failed: {', '.join(report['failed'])}.")
