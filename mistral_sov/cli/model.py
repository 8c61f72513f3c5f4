"""CLI commands for Mistral-native folders and for seeing what is trained: `msov convert`, `msov data show`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from . import JsonOpt, RecipeArg, SetOpt, _console, command, data_app


@command()
def convert(
    native: Path = typer.Argument(..., help="native Mistral folder: consolidated.safetensors, params.json, "
                                            "tekken.json or tokenizer.model.v*"),
    out: Path = typer.Option(..., "--out", help="the Hugging Face folder to write (must not exist)"),
    as_json: bool = JsonOpt,
) -> None:
    """Turn a native Mistral folder into a Hugging Face one, streamed tensor by tensor."""
    from ..export.stage import check_target, staged
    from ..model.mistral_native import convert_native

    if out.resolve().is_relative_to(native.resolve()):
        from ..errors import InputError

        raise InputError(f"--out {out} is inside the folder it converts ({native}); write it elsewhere.")
    check_target(out, overwrite=False)
    with staged(out) as stage:
        record = convert_native(native, stage.folder)
        os.replace(stage.folder, out)  # whole or not at all
    result = {"status": "ok", "out": str(out), **record}
    if as_json:
        print(json.dumps(result))
    else:
        _console(stderr=False).print(f"[green]converted[/] {native} -> {out} "
                                     f"(model.safetensors sha256 {record['written']['model.safetensors'][:16]}…)")


@command(group=data_app, name="show")
def data_show(
    recipe: Path = RecipeArg,
    rows: int = typer.Option(3, "--rows", min=1, help="how many training rows to show"),
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Rows as the model sees them: the text, supervised tokens highlighted, the ids and per-row counts."""
    from ..recipe import load_recipe
    from ..train.pipeline import prepare_inputs

    prepared = prepare_inputs(load_recipe(recipe, overrides), need_weights=False)
    decode = _decoder(prepared.tokenizer)
    shown = []
    for row in prepared.train.dataset.select(range(min(rows, len(prepared.train.dataset)))):
        ids, labels = row["input_ids"], row["labels"]
        pieces = [(decode(token), label != -100) for token, label in zip(ids, labels)]
        shown.append({"ids": ids, "supervised": [label != -100 for label in labels], "tokens": len(ids),
                      "supervised_tokens": sum(label != -100 for label in labels),
                      "text": "".join(text for text, _ in pieces), "pieces": pieces})
    if as_json:
        print(json.dumps({"status": "ok", "rows": [{k: v for k, v in r.items() if k != "pieces"} for r in shown]}))
        return
    from rich.markup import escape

    console = _console(stderr=False)
    for number, row in enumerate(shown, 1):
        console.print(f"[bold]row {number}[/]: {row['tokens']} tokens, {row['supervised_tokens']} supervised "
                      "[green](green)[/]")
        console.print("".join(f"[green]{escape(text)}[/]" if learned else escape(text)
                              for text, learned in row["pieces"]))
        console.print(f"[dim]ids: {row['ids']}[/]")


def _decoder(tokenizer):
    """One token's text, special tokens kept, by the tokenizer of record."""
    mistral = getattr(tokenizer, "msov_mistral", None)
    if mistral is not None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        raw = mistral.instruct_tokenizer.tokenizer
        return lambda token: raw.decode([token], special_token_policy=SpecialTokenPolicy.KEEP)
    return lambda token: tokenizer.decode([token])
