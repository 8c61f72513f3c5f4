"""`msov eval` and `msov generate`: held-out loss base vs adapter, and a quick look at answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli import JsonOpt, _console, command

TargetArg = typer.Argument(..., help="a finished run folder, an adapter folder, or a local model folder")


@command(name="eval")
def evaluate(
    target: Path = TargetArg,
    data: Path = typer.Option(..., "--data", help="held-out data file"),
    fmt: str = typer.Option("auto", "--format", help="auto | chat | instruction | completion"),
    max_seq_len: int = typer.Option(1024, "--max-seq-len"),
    batch_size: int = typer.Option(8, "--batch-size"),
    as_json: bool = JsonOpt,
) -> None:
    """Held-out loss and perplexity: base model and base + adapter, side by side."""
    from .data import load_data_file, tokenize_records
    from .evaluate import evaluation_loss, load_for_eval
    from .training import make_collator

    loaded = load_data_file(data, fmt)
    base, tuned, tokenizer = load_for_eval(str(target))
    tokens = tokenize_records(loaded.records, tokenizer, max_seq_len=max_seq_len)
    collator = make_collator(tokenizer)
    result = {"data": str(data), "rows": tokens.stats.rows_out,
              "base": evaluation_loss(base, tokens.dataset, collator, batch_size=batch_size)}
    if tuned is not None:
        result["adapter"] = evaluation_loss(tuned, tokens.dataset, collator, batch_size=batch_size)
    if as_json:
        print(json.dumps(result))
        return
    console = _console(stderr=False)
    console.print(f"{result['rows']} rows, {result['base']['tokens']} supervised tokens")
    for name in ("base", "adapter"):
        if name in result:
            console.print(f"{name:8} loss {result[name]['loss']:.4f}  perplexity {result[name]['perplexity']:.2f}")


@command(name="generate")
def generate(
    target: Path = TargetArg,
    prompt: str = typer.Option(..., "--prompt", help="the user's message"),
    system: Optional[str] = typer.Option(None, "--system", help="an optional system message"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    as_json: bool = JsonOpt,
) -> None:
    """Greedy answers to one prompt (chat template applied), from the base and, for a run, the adapter."""
    from .evaluate import generate_reply, load_for_eval

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    base, tuned, tokenizer = load_for_eval(str(target))
    answers = {"base": generate_reply(base, tokenizer, messages, max_new_tokens=max_new_tokens)}
    if tuned is not None:
        answers["adapter"] = generate_reply(tuned, tokenizer, messages, max_new_tokens=max_new_tokens)
    if as_json:
        print(json.dumps({"prompt": prompt, **answers}))
        return
    from rich.markup import escape

    console = _console(stderr=False)
    for name, text in answers.items():
        console.print(f"[bold]{name}:[/] {escape(text)}")
