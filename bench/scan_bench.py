"""Seconds `find_spans` (what `msov data scan` and finetune's scan run on every string) takes on one long string,
and how far each size is from linear (seconds per char relative to the smallest size; ~1.0 means linear).

    python bench/scan_bench.py                  # 10k, 100k, 1M, 10M chars
    python bench/scan_bench.py --sizes 10000 1000000

The strings are the shapes that made the old patterns rescan from every start position: one long word-character run
with no match, and prose with a finding every ~60 chars. Then per-kind recall and false positives on the labelled
corpus tests/scan_corpus/corpus.jsonl (synthetic rows).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from mistral_sov.data.scan import find_spans

SHAPES = {
    "run of letters": "a",
    "run of digits": "1",
    "dotted run": "a.",
    "prose with findings": "mail bob.smith@corp.example.com from 10.2.3.4, ok ",
    # Linear too, but phonenumbers costs ~150 us per number: 10M chars of nothing but phones take about a minute.
    "prose dense with phones": "call +44 20 7946 0958 or (415) 555-2671 ok ",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    args = parser.parse_args()
    find_spans("warm-up: lazy imports of +14155552671 and GB82 WEST 1234 5698 7654 32")
    print(f"{'shape':<25}{'chars':>12}{'seconds':>10}{'findings':>10}{'vs linear':>11}")
    for name, unit in SHAPES.items():
        base = None
        for size in args.sizes:
            text = (unit * (size // len(unit) + 1))[:size]
            start = time.perf_counter()
            found = len(find_spans(text))
            seconds = time.perf_counter() - start
            per_char = seconds / size
            base = base or per_char
            print(f"{name:<25}{size:>12,}{seconds:>10.3f}{found:>10,}{per_char / base:>11.2f}")
    corpus = Path(__file__).resolve().parent.parent / "tests" / "scan_corpus" / "corpus.jsonl"
    expected, hits, false = Counter(), Counter(), Counter()
    for line in corpus.read_text().splitlines():
        row = json.loads(line)
        found = Counter(kind for _, _, kind in find_spans(row["text"]))
        want = Counter(row["kinds"])
        expected += want
        hits += found & want
        false += found - want
    print(f"\n{'kind':<14}{'recall':>10}{'false pos':>11}")
    for kind in sorted(expected | false):
        print(f"{kind:<14}{hits[kind]:>5}/{expected[kind]:<4}{false[kind]:>11}")


if __name__ == "__main__":
    main()
