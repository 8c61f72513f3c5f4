"""Rendering for people (part of the CLI layer): progress bars, tables, summaries. Library code never prints."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class TrainingProgress:
    """A rich progress bar fed by the library's events: step, loss, tokens/s, ETA."""

    def __init__(self, console: Console, on_other_event):
        self.console = console
        self.on_other_event = on_other_event
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def on_event(self, kind: str, payload: dict) -> None:
        if kind == "train_begin":
            self.progress.start()
            self.task = self.progress.add_task("train", total=payload["max_steps"],
                                               completed=payload["start_step"], loss="-", tps="-")
        elif kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=payload["step"], tps=f"{payload['tokens_per_s']:,.0f}")
        elif kind == "log" and self.task is not None and "loss" in payload:
            self.progress.update(self.task, loss=f"{payload['loss']:.4f}")
        elif kind == "train_end":
            self.progress.stop()
        else:
            self.on_other_event(kind, payload)


def print_token_stats(console: Console, stats: dict) -> None:
    table = Table(title="tokens", show_edge=False)
    for column in ("split", "rows in", "rows kept", "truncated", "dropped", "tokens", "supervised", "len min/med/max"):
        table.add_column(column, justify="right")
    for split, s in stats.items():
        if not s:
            continue
        dropped = s["dropped_overlong"] + s["dropped_unsupervised"]
        table.add_row(split, str(s["rows_in"]), str(s["rows_out"]), str(s["truncated"]), str(dropped),
                      f"{s['tokens']:,}", f"{s['supervised_tokens']:,}",
                      f"{s['min_len']}/{s['median_len']:.0f}/{s['max_len']}")
    console.print(table)


def print_dry_run(console: Console, recipe, report: dict) -> None:
    console.print("[bold]resolved recipe[/]")
    console.print(escape(recipe.to_yaml()))
    console.print(f"recipe digest  sha256:{report['recipe_digest']}")
    console.print(f"model          {escape(report['model']['path'])} ({report['model']['architecture']})")
    p = report["parameters"]
    console.print(f"parameters     {p['trainable']:,} trainable of {p['total']:,} ({p['trainable_pct']:.3f}%)")
    for split in ("train", "eval"):
        for f in report["data"][split]:
            console.print(f"{split:5} data     {escape(f['path'])}: {f['rows']} rows, {f['format']}")
    print_token_stats(console, report["tokens"])
    console.print("[green]dry run ok[/]: nothing was trained.")


def print_run_summary(console: Console, summary: dict, *, demo: bool = False) -> None:
    train, ev = summary["train"], summary["eval"]
    console.print()
    console.print(f"[bold green]done[/]: {summary['name']} - {train['steps']} steps")
    if train["first_loss"] is not None:
        console.print(f"train loss     {train['first_loss']:.4f} -> {train['final_loss']:.4f}")
    if ev["before"] and ev["after"]:
        drop = 100.0 * (1 - ev["after"]["loss"] / ev["before"]["loss"])
        console.print(f"eval loss      {ev['before']['loss']:.4f} -> {ev['after']['loss']:.4f} ({drop:.0f}% lower)"
                      f"  perplexity {ev['before']['perplexity']:.1f} -> {ev['after']['perplexity']:.1f}")
    sample = summary.get("sample")
    if sample:
        question = next((m["content"] for m in reversed(sample["prompt"]) if m["role"] == "user"), "")
        console.print(f"[bold]sample question[/] {escape(question)}")
        console.print(f"  before: {escape(sample['before'] or '(empty)')}")
        console.print(f"  after:  {escape(sample['after'] or '(empty)')}")
        console.print(f"  reference: {escape(sample['reference'])}")
    console.print(f"run folder     {escape(summary['run_dir'])}")
    console.print(f"adapter        {escape(summary['adapter_dir'])}  (PeftModel.from_pretrained loads it)")
    if summary.get("loss_plot"):
        console.print(f"loss plot      {escape(summary['loss_plot'])}")
    if (Path(summary["run_dir"]) / "tensorboard").is_dir():
        console.print(f"tensorboard    tensorboard --logdir {escape(str(Path(summary['run_dir']) / 'tensorboard'))}")
    wall = summary.get("demo_wall_time_s") if demo else summary["wall_time_s"]
    console.print(f"time           {wall:.1f} s")


def print_scan(console: Console, report, redacted_to=None) -> None:
    console.print(f"scanned {report.rows} rows in {len(report.files)} file(s)")
    if not report.counts:
        console.print("[green]no likely personal data or secrets found[/]")
    else:
        table = Table(show_edge=False)
        for column in ("kind", "count", "examples (masked)"):
            table.add_column(column)
        for kind, count in sorted(report.counts.items()):
            examples = [f"{escape(f.where())} {escape(f.masked)}" for f in report.examples if f.kind == kind]
            table.add_row(kind, str(count), "\n".join(examples))
        console.print(table)
    if redacted_to:
        console.print(f"redacted copy written to {escape(str(redacted_to))}")
