"""`msov data convert`: any accepted data format to msov's chat JSONL (registered on the main app's data group)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import typer

from . import JsonOpt, command, data_app


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
    from ..data import load_data_file
    from ..errors import DataError

    if to != "chat":
        raise DataError(f"--to {to}: unknown target; expected chat")
    loaded = load_data_file(source, fmt)
    lines = []
    for place, record in zip(loaded.places, loaded.records):
        if "messages" not in record:
            if not record["prompt"]:
                raise DataError(f"{source}:{place}: text: a completion row without a prompt has no user turn, so "
                                "it cannot be written as a chat", hint="Keep such files in completion format.")
            record = {"messages": [{"role": "user", "content": record["prompt"]},
                                   {"role": "assistant", "content": record["completion"]}]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A temp name beside the target, then a rename: a reader never sees half a file.
    handle, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    result = {"status": "ok", "source": str(source), "format": loaded.format, "rows": len(lines), "out": str(out)}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"ok  {source} ({loaded.format}, {len(lines)} rows) -> {out} (chat)")
