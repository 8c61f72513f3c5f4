"""Read rows out of .jsonl, .json, .csv and .parquet files, each with the place it came from.

A place is what a person opens the file at: a line number for text files (the line a record starts on),
"row N" for Parquet, which has no lines. Readers report what they cannot parse as problems and keep going
where the format allows it (JSONL, CSV), so one run of `msov data validate` shows everything at once.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError
from .formats import detect_format

# (place, field or None, what is wrong)
Problem = tuple[str, "str | None", str]
Rows = list[tuple[str, dict]]
# What a streaming reader yields per row: (place, row, None), or (place, None, what is wrong).
Item = tuple[str, "dict | None", "str | None"]
# Rows per Arrow batch read from Parquet: bounds memory whatever the file's row groups.
BATCH_ROWS = 1024

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Python's parser gives up near 1,000 levels; no training row needs more than a handful.
TOO_DEEP = "the record is nested too deeply to read (arrays or objects inside each other over ~1,000 levels)"


def _lone_surrogate(row) -> str | None:
    """JSON escapes may spell half of a UTF-16 pair (\\ud800), which is no character: no tokenizer or file can
    hold it, so it is refused here, where the line is known, rather than failing later in a library."""
    try:
        strings = list(iter_strings(row))
    except RecursionError:
        return TOO_DEEP
    for text in strings:
        found = _SURROGATE.search(text)
        if found:
            return (f"a string holds a lone surrogate \\u{ord(found.group()):04x} (half of a UTF-16 pair, not a "
                    f"character) at character {found.start() + 1}: {text[max(0, found.start() - 20):found.start()]!r}")
    return None


def iter_strings(value) -> Iterator[str]:
    """Every string inside a row, however deeply nested (for scanning, and for training the tiny tokenizer)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_strings(item)


def _collect(items: Iterator[Item]) -> tuple[Rows, list[Problem]]:
    rows: Rows = []
    problems: list[Problem] = []
    for place, row, problem in items:
        if problem is None:
            rows.append((place, row))
        else:
            problems.append((place, None, problem))
    return rows, problems


def iter_jsonl(path: Path) -> Iterator[Item]:
    # Binary lines: text mode would also split on \r and U+2028, which are legal inside JSON strings.
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            place = str(number)
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield place, None, f"not UTF-8 text (byte {exc.start + 1} of the line)"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield place, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
                continue
            except RecursionError:
                yield place, None, TOO_DEEP
                continue
            surrogate = _lone_surrogate(row)
            if surrogate:
                yield place, None, surrogate
            elif not isinstance(row, dict):
                yield place, None, f"expected one JSON object per line, got {_json_type(row)}"
            else:
                yield place, row, None


def read_jsonl(path: Path) -> tuple[Rows, list[Problem]]:
    return _collect(iter_jsonl(path))


def iter_json(path: Path) -> Iterator[Item]:
    """One JSON document is parsed whole (the standard library has no streaming parser); .jsonl streams."""
    text = _read_text(path)
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
                        hint="A .json data file holds one array of records; for one record per line use .jsonl.")
    except RecursionError:
        raise DataError(f"{path}:1: {TOO_DEEP}")
    records, key = _records_of(path, document)
    try:
        newlines = [m.start() for m in re.finditer("\n", text)]
        lines = [str(bisect.bisect_left(newlines, start) + 1) for start in _record_starts(text, key)]
        if len(lines) != len(records):
            raise ValueError("walk disagrees with the parser")
    except (ValueError, IndexError):
        # Locating records is a convenience for messages; never fail a valid file over it.
        lines = [f"record {n}" for n in range(1, len(records) + 1)]
    del text
    for place, record in zip(lines, records):
        surrogate = _lone_surrogate(record)
        if surrogate:
            yield place, None, surrogate
        elif isinstance(record, dict):
            yield place, record, None
        else:
            yield place, None, f"expected each record to be a JSON object, got {_json_type(record)}"


def read_json(path: Path) -> tuple[Rows, list[Problem]]:
    return _collect(iter_json(path))


def _records_of(path: Path, document) -> tuple[list, str | None]:
    if isinstance(document, list):
        return document, None
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if detect_format(document) is None and len(lists) == 1:
            return document[lists[0]], lists[0]
        if detect_format(document) is not None:
            raise DataError(f"{path}:1: the file holds a single record; a .json data file holds an array of "
                            "records", hint="Wrap it in [ ... ], or write one record per line in a .jsonl file.")
    raise DataError(f"{path}:1: expected an array of records, or an object holding one array "
                    f'(e.g. {{"data": [...]}}), got {_json_type(document)}'
                    + (f" with keys {', '.join(document)}" if isinstance(document, dict) else ""),
                    hint="A .json data file holds one array of records; for one record per line use .jsonl.")


def _record_starts(text: str, key: str | None) -> list[int]:
    """Offsets where each element of the records array begins, by walking the (already valid) document."""
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if key is not None:
        # Walk the top-level object; the last occurrence of a key wins, as it does in json.loads.
        i, array_at = _skip(text, i + 1), None
        while text[i] != "}":
            name, i = decoder.raw_decode(text, i)
            i = _skip(text, _skip(text, i) + 1)
            if name == key:
                array_at = i
            _, i = decoder.raw_decode(text, i)
            i = _skip(text, i)
            if text[i] == ",":
                i = _skip(text, i + 1)
        i = array_at
    starts = []
    i = _skip(text, i + 1)
    while text[i] != "]":
        starts.append(i)
        _, i = decoder.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] == ",":
            i = _skip(text, i + 1)
    return starts


def iter_csv(path: Path) -> Iterator[Item]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [name.strip() for name in header]
            _check_header(path, header)
            previous = reader.line_num
            for cells in reader:
                # A quoted field may span lines: the row starts on the line after the previous row ended.
                place, previous = str(previous + 1), reader.line_num
                if not cells:
                    continue
                if len(cells) > len(header):
                    yield place, None, (f"{len(cells)} fields, but the header (line 1) names "
                                        f"{len(header)}; is a field with a comma left unquoted?")
                    continue
                yield place, dict(zip(header, cells)), None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({exc.reason})",
                            hint="Save the file as UTF-8.")
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: unreadable CSV: {exc}")


def read_csv(path: Path) -> tuple[Rows, list[Problem]]:
    return _collect(iter_csv(path))


def _check_header(path: Path, header: list[str]) -> None:
    seen = set()
    for column, name in enumerate(header, 1):
        if not name:
            raise DataError(f"{path}:1: column {column} of the header row has no name",
                            hint="The first row of a CSV data file names its columns, e.g. instruction,input,output.")
        if name in seen:
            raise DataError(f"{path}:1: column name '{name}' appears twice in the header row")
        seen.add(name)


def iter_parquet(path: Path) -> Iterator[Item]:
    import pyarrow
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row, None
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}")


def read_parquet(path: Path) -> tuple[Rows, list[Problem]]:
    return _collect(iter_parquet(path))


def iter_saved_dataset(path: Path, split: str | None = None) -> Iterator[Item]:
    """A `datasets` save_to_disk folder (Dataset or DatasetDict) or one .arrow file; Arrow is memory-mapped."""
    import datasets

    try:
        data = datasets.Dataset.from_file(str(path)) if path.is_file() else datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path}: not a readable `datasets` folder or Arrow file: {exc}")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(data)}; "
                            + (f"there is no split '{split}'" if split else "say which one to read"),
                            hint="Give `split: train` in the recipe's data file entry, or --split on the command line.")
        data = data[split]
    for n, row in enumerate(data, 1):
        yield f"row {n}", row, None


def read_saved_dataset(path: Path, split: str | None = None) -> tuple[Rows, list[Problem]]:
    return _collect(iter_saved_dataset(path, split))


READERS = {".arrow": read_saved_dataset, ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}
# The same, row by row, so validation and loading hold one row (or one Parquet batch) at a time.
STREAMS = {".arrow": iter_saved_dataset, ".jsonl": iter_jsonl, ".json": iter_json, ".csv": iter_csv,
           ".parquet": iter_parquet}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason})", hint="Save the file as UTF-8.")


def _skip(text: str, i: int) -> int:
    return _WHITESPACE.match(text, i).end()




def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
