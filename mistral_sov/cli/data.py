"""`msov data ...`: check training data before a run (validate, scan, stats), rewrite it (convert), and see rows
as the model sees them (show)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from . import show
from .base import JsonOpt, RecipeArg, SetOpt, command, data_app, emit

DataFilesArg = typer.Argument(..., help="data files (.jsonl, .json, .csv, .parquet)")


@command(group=data_app, name="validate")
def data_validate(
    files: List[Path] = DataFilesArg,
    fmt: str = typer.Option("auto", "--format", help="auto | chat | sharegpt | instruction | completion | preference"),
    split: Optional[str] = typer.Option(None, "--split", help="the split of a `datasets` DatasetDict folder"),
    as_json: bool = JsonOpt,
) -> None:
    """Check data files row by row; report every problem as file:line: field: problem."""
    from ..data import load_data_file

    results = []
    for path in files:
        loaded = load_data_file(path, fmt, sft=False, split=split, keep_records=False)
        results.append({"path": str(path), "format": loaded.format, "rows": loaded.rows, "sha256": loaded.sha256,
                        "roles": loaded.roles, "fields": loaded.fields})
    emit({"status": "ok", "files": results}, show.print_validated)


@command(group=data_app, name="scan")
def data_scan(
    files: List[Path] = DataFilesArg,
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="exit 3 if any of these kinds is found: "
                                          "comma-separated kinds, or 'any'"),
    redact_to: Optional[Path] = typer.Option(None, "--redact", help="write a redacted copy: a file for one "
                                             "input, a folder for several"),
    as_json: bool = JsonOpt,
) -> None:
    """Find likely personal data and secrets (e-mail, phone, IBAN, card, IP, API keys, private keys, IDs)."""
    from ..data.scan import KINDS, redact_files, scan_files
    from ..errors import DataError, UsageError

    wanted = set()
    if fail_on:
        wanted = set(KINDS) if fail_on.strip() == "any" else {k.strip() for k in fail_on.split(",") if k.strip()}
        unknown = wanted - set(KINDS)
        if unknown:
            raise UsageError(f"--fail-on: unknown kind(s) {', '.join(sorted(unknown))}; expected any or "
                             f"{', '.join(KINDS)}")
    report = scan_files(files) if redact_to is None else redact_files(files, redact_to)
    failing = sorted(k for k in wanted if report.counts.get(k))
    emit({**report.summary(), "examples": [vars(f) for f in report.examples],
          "redacted_to": str(redact_to) if redact_to else None, "failed_on": failing},
         lambda screen, _: show.print_scan(screen, report, redact_to))
    if failing:
        raise DataError(f"--fail-on: found {', '.join(f'{report.counts[k]} {k}' for k in failing)} in the data.",
                        hint="Remove or redact them (msov data scan FILE --redact OUT) before training.")


@command(group=data_app, name="stats")
def data_stats(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Token statistics of a recipe's data with its model's tokenizer and chat template."""
    from ..recipe import load_recipe
    from ..train.pipeline import prepare_inputs

    prepared = prepare_inputs(load_recipe(recipe, overrides))
    emit({"train": prepared.train.stats.as_dict(), "eval": prepared.eval.stats.as_dict() if prepared.eval else None},
         show.print_token_stats)


@command(group=data_app, name="convert")
def data_convert(
    source: Path = typer.Argument(..., help="data file (.jsonl, .json, .csv, .parquet)"),
    to: str = typer.Option("chat", "--to", help="chat (the only target: msov's chat JSONL)"),
    out: Path = typer.Option(..., "--out", help="the .jsonl file to write"),
    fmt: str = typer.Option("auto", "--format", help="the source's format: auto | chat | sharegpt | instruction | "
                                                     "completion"),
    as_json: bool = JsonOpt,
) -> None:
    """Rewrite a data file as chat JSONL, one {"messages": [...]} per line; written whole or not at all."""
    from ..data.convert import convert_to_chat

    loaded, rows = convert_to_chat(source, out, fmt, to=to)
    emit({"status": "ok", "source": str(source), "format": loaded.format, "rows": rows, "out": str(out)},
         show.print_converted_data)


@dataclass
class ShownRows:
    """Training rows as the model sees them; each row's "pieces" (token text, supervised) are for the screen."""

    rows: list[dict]

    def to_json(self) -> dict:
        return {"status": "ok", "rows": [{k: v for k, v in r.items() if k != "pieces"} for r in self.rows]}


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
    emit(ShownRows(shown), show.print_shown_rows)


def _decoder(tokenizer):
    """One token's text, special tokens kept, by the tokenizer of record."""
    mistral = getattr(tokenizer, "msov_mistral", None)
    if mistral is not None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        raw = mistral.instruct_tokenizer.tokenizer
        return lambda token: raw.decode([token], special_token_policy=SpecialTokenPolicy.KEEP)
    return lambda token: tokenizer.decode([token])
