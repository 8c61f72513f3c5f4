"""`msov data convert`: any accepted data file rewritten as msov's chat JSONL, one {"messages": [...]} per line.

The file is checked whole first (all or nothing, as training reads it), then read again one record at a time into
a temp file beside the target that is renamed into place: memory does not grow with the file and a reader never
sees half of the output.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import DataError
from ..guard.paths import refuse_overlap
from .loading import LoadedData, iter_records, load_data_file

TARGETS = ("chat",)


def convert_to_chat(source: Path, out: Path, fmt: str = "auto", *, to: str = "chat") -> tuple[LoadedData, int]:
    """Write `source` as chat JSONL at `out`; returns the checked file's facts and the rows written."""
    if to not in TARGETS:
        raise DataError(f"--to {to}: unknown target; expected {', '.join(TARGETS)}")
    refuse_overlap(out, [source], what="--out")  # the file is read again while the output is written
    loaded = load_data_file(source, fmt, keep_records=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    rows = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            for place, record in iter_records(loaded.path, loaded.format, loaded.split):
                f.write(json.dumps(_as_chat(record, source, place), ensure_ascii=False) + "\n")
                rows += 1
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return loaded, rows


def _as_chat(record: dict, source: Path, place: str) -> dict:
    if "messages" in record:
        return record
    if not record["prompt"]:
        raise DataError(f"{source}:{place}: text: a completion row without a prompt has no user turn, so it cannot "
                        "be written as a chat", hint="Keep such files in completion format.")
    return {"messages": [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["completion"]}]}
