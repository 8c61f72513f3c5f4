"""Find likely personal data and secrets in training data before they are baked into weights.

Cheap, local pattern checks with validation where a checksum exists (Luhn for cards, mod-97 for IBANs), so the
counts mean something. Kinds are matched in a fixed order and a matched span is not matched again by a later,
looser kind (a card number is not also reported as a phone number).
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import DataError, UsageError
from .readers import BATCH_ROWS, STREAMS, iter_strings

EXAMPLES_PER_KIND = 5


def _luhn(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban(candidate: str) -> bool:
    from stdnum import iban  # country lengths and formats as well as mod-97

    return iban.is_valid(candidate)


def _ipv4(candidate: str) -> bool:
    try:
        return not ipaddress.IPv4Address(candidate).is_loopback
    except ValueError:
        return False


def _ipv6(candidate: str) -> bool:
    try:
        address = ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)


# Regions whose national formats (no +country prefix) are recognised; international numbers are found whatever these.
PHONE_REGIONS = ("US", "GB", "DE", "FR")
# phonenumbers' matcher is slow per character (1 MB of prose: ~16 s), so it only sees short digit-bearing windows
# that are a whole run of digits and separators; a longer run (a table of numbers) is no phone number and costs nothing.
_PHONE_WINDOW = re.compile(
    r"(?<![\w+])(?<!\d[.\-/ \t])\+?\(?\d[\d \t().\-/]{5,24}\d(?!\w)(?![.\-/ \t]\d)")


def _phones(text: str) -> Iterable[tuple[int, int]]:
    import phonenumbers

    for window in _PHONE_WINDOW.finditer(text):
        if sum(c.isdigit() for c in window.group()) < 7:
            continue
        for region in PHONE_REGIONS:
            found = [(window.start() + m.start, window.start() + m.end)
                     for m in phonenumbers.PhoneNumberMatcher(window.group(), region)]
            if found:
                yield from found
                break


# (kind, pattern or finder of (start, end) spans in order, validator or None), in matching order: specific before loose.
PATTERNS: list[tuple[str, re.Pattern | Callable[[str], Iterable[tuple[int, int]]], Callable[[str], bool] | None]] = [
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,8}PRIVATE KEY(?: BLOCK)?-----"), None),
    ("api_key", re.compile(
        r"\b(?:(?:AKIA|ASIA)[0-9A-Z]{16}|github_pat_[A-Za-z0-9_]{22,255}|[sr]k_live_[A-Za-z0-9]{24,99}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9-]{10,}|hf_[A-Za-z0-9]{30,}"
        r"|sk-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.(?:eyJ[A-Za-z0-9_-]*|[A-Za-z0-9_-]{10,})\.[A-Za-z0-9_-]*)"),
     None),
    # An AWS secret key is 40 base64 characters, only told apart from other text by the name it is assigned to.
    ("api_key", re.compile(r"(?i:aws).{0,20}?(?i:secret|key).{0,20}?[=:]\s{0,4}[\"']?(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
     None),
    # Every quantifier is bounded (RFC 5321: local part <= 64, labels <= 63) and a match may only start where a run
    # starts, so a long run with no match is walked once rather than once per start position (that was quadratic).
    ("email", re.compile(
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,63}"),
     None),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b", re.IGNORECASE), _iban),
    ("credit_card", re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"), _luhn),
    ("national_id", re.compile(
        r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"  # US SSN
        r"|\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),  # UK National Insurance
     None),
    ("ip_address", re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])"), _ipv4),  # octet ranges: ipaddress
    ("ip_address", re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])"), _ipv6),
    ("phone", _phones, None),
]
KINDS = sorted({kind for kind, _, _ in PATTERNS})


@dataclass
class Finding:
    kind: str
    path: str
    place: str
    masked: str

    def where(self) -> str:
        return f"{self.path}:{self.place}" if self.place.isdigit() else f"{self.path} ({self.place})"


@dataclass
class ScanReport:
    files: list[str] = field(default_factory=list)
    rows: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: list[Finding] = field(default_factory=list)  # at most EXAMPLES_PER_KIND per kind, masked

    def summary(self) -> dict:
        """What may be recorded in provenance: counts only, never the findings themselves."""
        return {"files": len(self.files), "rows": self.rows, "counts": dict(sorted(self.counts.items()))}


def mask(text: str) -> str:
    if len(text) <= 6:
        return "*" * len(text)
    return f"{text[:2]}{'*' * (len(text) - 4)}{text[-2:]}"


def _spans(pattern, text: str) -> Iterable[tuple[int, int]]:
    if callable(pattern):
        yield from pattern(text)
        return
    for match in pattern.finditer(text):
        yield match.span("secret" if "secret" in pattern.groupindex else 0)


def find_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every finding in `text`, without overlaps."""
    # `spans` stays sorted and disjoint, so the one earlier span a candidate could overlap is found by bisection, and
    # each kind's (ordered) finds are merged in once: linear in the number of findings, not quadratic.
    spans: list[tuple[int, int, str]] = []
    for kind, pattern, valid in PATTERNS:
        added = []
        for start, end in _spans(pattern, text):
            i = bisect.bisect_left(spans, (end,))
            if i and spans[i - 1][1] > start:
                continue
            if valid is None or valid(text[start:end]):
                added.append((start, end, kind))
        if added:
            spans = sorted(spans + added)
    return spans


def redact(text: str) -> str:
    pieces, last = [], 0
    for start, end, kind in find_spans(text):
        pieces += [text[last:start], f"[REDACTED:{kind.upper()}]"]
        last = end
    return "".join(pieces) + text[last:]


def _map_strings(value, func):
    if isinstance(value, str):
        return func(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, func) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, func) for v in value]
    return value


def scan_rows(report: ScanReport, path: str, rows: Iterable[tuple[str, object]]) -> ScanReport:
    """Add the findings of (place, row) pairs to `report`."""
    for _ in scanned(report, path, rows):
        pass
    return report


def scanned(report: ScanReport, path: str, rows: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """The same (place, row) pairs, each scanned into `report` as it passes: one read of a file can both scan and
    tokenise it (or write a redacted copy), holding one row at a time."""
    report.files.append(path)
    for place, row in rows:
        report.rows += 1
        for text in iter_strings(row):
            for start, end, kind in find_spans(text):
                report.counts[kind] += 1
                if sum(f.kind == kind for f in report.examples) < EXAMPLES_PER_KIND:
                    report.examples.append(Finding(kind, path, place, mask(text[start:end])))
        yield place, row


def _read(path: Path) -> Iterator[tuple[str, dict]]:
    """(place, row) one at a time (a .json document is parsed whole); the first unreadable row is an error."""
    reader = STREAMS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported data file type '{path.suffix}'; supported: {', '.join(STREAMS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    return _rows(path, reader(path))


def _rows(path: Path, items) -> Iterator[tuple[str, dict]]:
    for place, row, problem in items:
        if problem is not None:
            raise DataError(f"{path}:{place}: {problem}", hint=f"`msov data validate {path}` lists every problem.")
        yield place, row


def scan_files(paths: Iterable[str | Path]) -> ScanReport:
    report = ScanReport()
    for path in map(Path, paths):
        scan_rows(report, str(path), _read(path))
    return report


def redact_file(path: str | Path, out: str | Path) -> ScanReport:
    """Write a copy of `path` with every finding replaced by [REDACTED:KIND], in the same file type, atomically.
    JSONL and CSV are written row by row as they are read, Parquet in batches; a .json array is held whole."""
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise UsageError(f"--redact: '{out}' is the input file; write the redacted copy somewhere else.")
    rows = _read(path)
    report = ScanReport()
    redacted = (_map_strings(row, redact) for _, row in scanned(report, str(path), rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        _write_like(path.suffix.lower(), redacted, tmp, source=path)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def redact_files(paths: list[Path], out: Path) -> ScanReport:
    """Redact each input to `out` (a file for one input with a suffix, else a folder of same-named copies)."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and out.suffix:
        targets = [out]
    else:
        seen: dict[str, Path] = {}
        for path in paths:
            if path.name in seen:
                raise DataError(f"--redact: '{seen[path.name]}' and '{path}' would both be written to "
                                 f"'{out / path.name}'; redact them in separate runs.")
            seen[path.name] = path
        targets = [out / path.name for path in paths]
    report = ScanReport()
    for path, target in zip(paths, targets):
        one = redact_file(path, target)
        report.files += one.files
        report.rows += one.rows
        report.counts.update(one.counts)
        report.examples += one.examples
    return report


def _write_like(suffix: str, rows: Iterable[dict], target: Path, *, source: Path) -> None:
    if suffix == ".jsonl":
        with open(target, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif suffix == ".json":
        target.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif suffix == ".csv":
        import csv

        # Read the header as the reader did (BOM dropped, names stripped), or the rows' keys would not match it.
        with open(source, newline="", encoding="utf-8-sig") as handle:
            header = [name.strip() for name in next(csv.reader(handle))]
        with open(target, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    else:
        import itertools

        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(source)
        with pq.ParquetWriter(target, schema) as writer:
            rows = iter(rows)
            while batch := list(itertools.islice(rows, BATCH_ROWS)):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
