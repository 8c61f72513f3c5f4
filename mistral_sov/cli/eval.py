"""`msov eval` and `msov generate`: held-out loss base vs adapter, and a quick look at answers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import show
from .base import JsonOpt, command, emit

TargetArg = typer.Argument(..., help="a finished run folder, an adapter folder, or a local model folder")


@command(name="eval")
def evaluate(
    target: Path = TargetArg,
    data: Optional[Path] = typer.Option(None, "--data", help="held-out data file (default: the run's data.eval files)"),
    fmt: str = typer.Option("auto", "--format", help="auto | chat | instruction | completion"),
    max_seq_len: int = typer.Option(1024, "--max-seq-len"),
    batch_size: int = typer.Option(8, "--batch-size"),
    as_json: bool = JsonOpt,
) -> None:
    """Held-out loss and perplexity: base model and base + adapter, side by side."""
    from ..data import load_data_file, tokenize_records
    from ..evaluate import evaluation_loss, load_for_eval
    from ..train.trainer import make_collator

    sources = [(data, fmt)] if data is not None else _run_eval_files(target)
    records = [record for path, form in sources for record in load_data_file(path, form).records]
    base, tuned, tokenizer = load_for_eval(str(target))
    tokens = tokenize_records(records, tokenizer, max_seq_len=max_seq_len)
    collator = make_collator(tokenizer)
    result = {"data": ", ".join(str(path) for path, _ in sources), "rows": tokens.stats.rows_out,
              "base": evaluation_loss(base, tokens.dataset, collator, batch_size=batch_size)}
    if tuned is not None:
        result["adapter"] = evaluation_loss(tuned, tokens.dataset, collator, batch_size=batch_size)
    emit(result, show.print_eval)


def _run_eval_files(target: Path) -> list[tuple[Path, str]]:
    """The held-out files a finished run was trained against, from its resolved recipe.yaml."""
    from ..errors import InputError
    from ..recipe import load_recipe

    saved = target / "recipe.yaml"
    if not saved.is_file():
        raise InputError(f"msov eval: '{target}' is not a run folder (no recipe.yaml), so there is no held-out data "
                         "to default to.", hint="Pass --data FILE.")
    files = load_recipe(saved).data.eval
    if not files:
        raise InputError(f"msov eval: the run's recipe ({saved}) has no data.eval files.", hint="Pass --data FILE.")
    return [(Path(f.path), f.format) for f in files]


@command(name="generate")
def generate(
    target: Path = TargetArg,
    prompt: str = typer.Option(..., "--prompt", help="the user's message"),
    system: Optional[str] = typer.Option(None, "--system", help="an optional system message"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    as_json: bool = JsonOpt,
) -> None:
    """Greedy answers to one prompt (chat template applied), from the base and, for a run, the adapter."""
    from ..evaluate import generate_reply, load_for_eval

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    base, tuned, tokenizer = load_for_eval(str(target))
    answers = {"base": generate_reply(base, tokenizer, messages, max_new_tokens=max_new_tokens)}
    if tuned is not None:
        answers["adapter"] = generate_reply(tuned, tokenizer, messages, max_new_tokens=max_new_tokens)
    emit({"prompt": prompt, **answers}, show.print_answers)
