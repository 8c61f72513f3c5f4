"""Load one data file: read it, check every row, normalise. All or nothing: a file with any bad row loads nothing.

Rows are read and checked one at a time, so checking a file (`keep_records=False`) holds no more than one row
(one Parquet batch; a .json document is parsed whole) plus the problems found, however large the file.
`iter_records` then reads a checked file again, one normalised record at a time, for stages (scanning,
tokenising) that need every record but not all of them at once.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..trust.hashing import sha256_file
from .formats import EXPECTED, FORMATS, SFT_FORMATS, check_row, detect_format, fields_of
from .readers import STREAMS, Problem, iter_saved_dataset

SHOWN_PROBLEMS = 20


@dataclass
class LoadedData:
    path: Path
    format: str  # resolved: never "auto"
    records: list[dict]  # normalised: {"messages": [...]} or {"prompt", "completion"}
    rows: int
    sha256: str  # of the file's bytes, for provenance
    # Where each record came from ("17", or "row 3" for Parquet), for reports that point back into the file.
    places: list[str] = field(default_factory=list, repr=False)
    roles: list[str] = field(default_factory=list)  # speaker names as the file spells them (human, gpt, ...)
    fields: list[str] = field(default_factory=list)  # every top-level field the rows hold, used or not
    split: str | None = None  # the DatasetDict split read, so `iter_records` can read the same rows again


def load_data_file(path: str | Path, fmt: str = "auto", *, sft: bool = True, split: str | None = None,
                   keep_records: bool = True) -> LoadedData:
    """`sft`: refuse formats supervised fine-tuning cannot train on (preference pairs); validation reads them all.
    `path` may be a file, a `datasets` save_to_disk folder (`split` picks a DatasetDict's split) or a glob.
    `keep_records=False` checks and counts every row but keeps none (records and places stay empty)."""
    if glob.has_magic(str(path)):
        return _load_glob(str(path), fmt, sft=sft, keep_records=keep_records)
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{path}: unknown data format '{fmt}'; expected auto, {', '.join(FORMATS)}")
    saved = path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))
    if not path.is_file() and not saved:
        what = "is a folder, not a data file or `datasets` folder" if path.is_dir() else "no such data file"
        raise DataError(f"{path}: {what}", hint="Paths in a recipe are relative to the recipe file's folder.")
    reader = iter_saved_dataset if saved else STREAMS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported data file type '{path.suffix or '(no suffix)'}'; "
                        f"supported: {', '.join(STREAMS)}, or a `datasets` save_to_disk folder",
                        hint="Convert the file to JSONL (one JSON object per line), JSON, CSV or Parquet.")

    items = iter_saved_dataset(path, split) if reader is iter_saved_dataset else reader(path)
    problems: list[Problem] = []
    records, places, roles, fields = [], [], {}, {}
    resolved, source = (fmt, None) if fmt != "auto" else (None, None)
    # Rows before the first one of a known format wait for it (they are all problems: bounded by the bad rows).
    waiting: list[tuple[str, dict]] = []
    read = bad_rows = good = 0

    def check(place: str, row: dict) -> None:
        nonlocal bad_rows, good
        # A row of no recognisable format is checked against the file's format: that names the missing field.
        if resolved is None or (fmt == "auto" and detect_format(row) not in (None, resolved)):
            problems.append((place, None, _mismatch(row, resolved, source)))
            bad_rows += 1
            return
        record, found = check_row(resolved, row)
        problems.extend((place, name, what) for name, what in found)
        bad_rows += bool(found)
        if record is not None:
            good += 1
            if keep_records and not problems:  # once any row is bad the file loads nothing: stop keeping
                records.append(record)
                places.append(place)

    for place, row, problem in items:
        read += 1
        if problem is not None:
            problems.append((place, None, problem))  # a reader reports one problem per row it could not read
            bad_rows += 1
            continue
        fields.update(dict.fromkeys(row))
        for turn in row.get("conversations") or row.get("messages") or ():
            name = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            if isinstance(name, str):
                roles[name] = None
        if resolved is None:
            resolved = detect_format(row)
            if resolved is None:
                waiting.append((place, row))
                continue
            source = place
            for early in waiting:
                check(*early)
            waiting = []
        check(place, row)
    for early in waiting:
        check(*early)
    if not read:
        raise DataError(f"{path}: the file holds no rows", hint="Point the recipe at a file with training examples.")
    if problems:
        raise _problems_error(path, problems, bad_rows, resolved, source)
    if sft and resolved not in SFT_FORMATS:
        raise DataError(f"{path}: {resolved} format is not an SFT format: fine-tuning learns from one answer per "
                        f"prompt, not from chosen/rejected pairs",
                        hint=f"Give a file in one of {', '.join(SFT_FORMATS)} format; `msov data validate` checks "
                             "preference files.")
    return LoadedData(path=path, format=resolved, records=records, rows=good, sha256=_digest(path),
                      places=places, roles=list(roles), fields=list(fields), split=split if saved else None)


def iter_records(path: str | Path, fmt: str, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """(place, record) for each record of a file `load_data_file` has accepted as `fmt` (a resolved format, as
    in `LoadedData.format`), normalised the same way, one at a time: memory does not grow with the file (a .json
    document is still parsed whole). A glob's places are `name:place`, as `load_data_file` gives them.
    A row that no longer passes (the file changed since it was checked) is a DataError naming it."""
    if glob.has_magic(str(path)):
        for match in sorted(glob.glob(str(path), recursive=True)):
            for place, record in iter_records(match, fmt):
                yield f"{Path(match).name}:{place}", record
        return
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"iter_records: {fmt!r} is not a resolved data format; expected one of {FORMATS}")
    saved = path.is_dir()
    items = iter_saved_dataset(path, split) if saved else STREAMS[path.suffix.lower()](path)
    for place, row, problem in items:
        found = [(None, problem)] if problem is not None else []
        record = None
        if not found:
            record, found = check_row(fmt, row)
        if found:
            name, what = found[0]
            raise DataError(format_problem(path, (place, name, what)) + " (read again after it was checked: "
                            "the file changed meanwhile)", hint=f"Check it again with `msov data validate {path}`.")
        if record is not None:
            yield place, record


def _digest(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    # A saved dataset: its files by name and content, so a changed split or shard changes the digest.
    lines = [f"{sha256_file(f)}  {f.relative_to(path).as_posix()}\n" for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _load_glob(pattern: str, fmt: str, *, sft: bool, keep_records: bool) -> LoadedData:
    """Hugging Face-style data_files (`data/*.jsonl`): every match, in name order, held to one format."""
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise DataError(f"{pattern}: no file matches this pattern",
                        hint="Paths in a recipe are relative to the recipe file's folder.")
    parts = [load_data_file(match, fmt, sft=sft, keep_records=keep_records) for match in matches]
    formats = {part.format for part in parts}
    if len(formats) > 1:
        raise DataError(f"{pattern}: the matching files are in different formats ("
                        + ", ".join(f"{part.path}: {part.format}" for part in parts) + ")",
                        hint="Give each format its own data file entry.")
    lines = "".join(f"{part.sha256}  {part.path}\n" for part in parts)
    return LoadedData(path=Path(pattern), format=formats.pop(), records=[r for p in parts for r in p.records],
                      rows=sum(p.rows for p in parts), sha256=hashlib.sha256(lines.encode()).hexdigest(),
                      places=[f"{p.path.name}:{place}" for p in parts for place in p.places],
                      roles=list(dict.fromkeys(r for p in parts for r in p.roles)),
                      fields=list(dict.fromkeys(f for p in parts for f in p.fields)))


def _mismatch(row: dict, resolved: str | None, source: str | None) -> str:
    found = f"row has: {fields_of(row)}"
    if resolved is None or detect_format(row) is None:
        return f"no known format ({found}); expected {'; or '.join(EXPECTED.values())}"
    return (f"looks like {detect_format(row)} format ({found}), but this file is {resolved} format "
            f"(detected from {_place_words(source)}): expected {EXPECTED[resolved]}")


def _problems_error(path: Path, problems: list[Problem], affected: int, fmt: str | None,
                    source: str | None) -> DataError:
    # Readers report unparsable rows before the rows are checked; show everything in file order.
    problems = sorted(problems, key=lambda problem: int(problem[0].rpartition(" ")[2] or 0))
    about = "no known format"
    if fmt:
        about = f"{fmt} format" + (f", detected from {_place_words(source)}" if source else "")
    lines = [f"{path}: {len(problems)} problem{'s' * (len(problems) != 1)} in {affected} "
             f"row{'s' * (affected != 1)} ({about}):"]
    lines += [format_problem(path, problem) for problem in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"... and {len(problems) - SHOWN_PROBLEMS} more problems ({affected} rows affected)")
    error = DataError("\n".join(lines),
                      hint=f"Fix the rows listed, then check the file alone with `msov data validate {path}`.")
    # The whole list, for callers (e.g. `msov data validate --json`) that show more than the message does.
    error.problems = [format_problem(path, problem) for problem in problems]
    return error


def format_problem(path: Path, problem: Problem) -> str:
    place, name, what = problem
    return f"{path}:{place}: {name}: {what}" if name else f"{path}:{place}: {what}"


def _place_words(place: str) -> str:
    return place if place.startswith(("row", "record")) else f"line {place}"

