"""Peak RSS of `msov data validate` and `msov finetune --dry-run` on generated 30 MB and 300 MB chat JSONL files.

    python bench/data_memory.py [--sizes 30,300] [--skip-dry-run] [--dir /tmp/msov-data-bench]

The files go to /tmp (never the repo). Each command runs in its own process; its peak RSS is the child's
ru_maxrss, as the kernel counts it. Streaming reads aim for the larger file within ~1.5x of the smaller.

Measured on 2 shared cores (30 MB = 98k rows, 300 MB = 975k rows), peak RSS (CPU seconds, user + system: wall
time meant little on a machine other jobs loaded 3-4x):
    data validate        before streaming 280 MB / 2,480 MB; row by row: 35 MB / 35 MB (2.8 s / 32 s CPU)
    finetune --dry-run   records and encoded rows held as Python lists: 30 MB: 1,338 MB (147 s CPU);
                         300 MB: past 3.7 GB and still growing after 800 s CPU (stopped there, not waited for)
                         streamed (files checked, then read again into scan + tokeniser, rows written to a
                         memory-mapped Arrow file in the temp folder): 30 MB: 531 MB (129 s CPU), the same as a
                         1,000-row file (537 MB: torch and transformers loaded); 300 MB: 584 MB (1,037 s CPU,
                         1,281 s wall; 1.10x the 30 MB peak for 10x the rows)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROW = {"messages": [{"role": "system", "content": "You are the IT helpdesk."},
                    {"role": "user", "content": "My printer says paper jam but there is no paper in it. {n}"},
                    {"role": "assistant", "content": "Open the rear tray, remove any torn scraps, then power-cycle "
                                                     "the printer and print a test page. {n}"}]}


def generate(path: Path, megabytes: int) -> int:
    if path.is_file() and path.stat().st_size >= megabytes * 1_000_000:
        return sum(1 for _ in path.open("rb"))
    template, rows, size = json.dumps(ROW), 0, 0
    with path.open("w") as f:
        while size < megabytes * 1_000_000:
            line = template.replace("{n}", str(rows)) + "\n"
            f.write(line)
            size, rows = size + len(line), rows + 1
    return rows


def peak_rss(args: list[str]) -> tuple[float, float, float, int]:
    """(peak MB, wall seconds, CPU seconds, exit code) of one child process. CPU seconds (user + system) stay
    comparable on a shared, loaded machine, where wall time does not."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the table, not the commands' JSON
        os.execv(sys.executable, [sys.executable, "-m", "mistral_sov", *args])
    _, status, usage = os.wait4(pid, 0)
    return (usage.ru_maxrss / 1024, time.perf_counter() - start, usage.ru_utime + usage.ru_stime,
            os.waitstatus_to_exitcode(status))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="30,300")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/msov-data-bench"))
    parser.add_argument("--skip-dry-run", action="store_true")
    options = parser.parse_args()
    options.dir.mkdir(parents=True, exist_ok=True)
    model = options.dir / "tiny-model"
    if not options.skip_dry_run and not model.is_dir():
        subprocess.run([sys.executable, "-m", "mistral_sov", "tiny-model", str(model)], check=True,
                       stdout=subprocess.DEVNULL)
    print(f"{'file':>8} {'rows':>9} {'command':>18} {'peak RSS MB':>12} {'wall s':>8} {'CPU s':>8} {'exit':>5}")
    for megabytes in map(int, options.sizes.split(",")):
        data = options.dir / f"chat_{megabytes}mb.jsonl"
        rows = generate(data, megabytes)
        runs = [("data validate", ["data", "validate", str(data), "--json"])]
        if not options.skip_dry_run:
            recipe = options.dir / f"recipe_{megabytes}.yaml"
            recipe.write_text(f"name: bench\nmodel: {{path: {model}, dtype: float32}}\n"
                              f"data:\n  train:\n    - {{path: {data}, format: chat}}\n"
                              f"output: {{dir: {options.dir / 'out'}}}\n")
            runs.append(("finetune --dry-run", ["finetune", str(recipe), "--dry-run", "--json"]))
        for name, args in runs:
            mb, seconds, cpu, code = peak_rss(args)
            print(f"{megabytes:>6}MB {rows:>9,} {name:>18} {mb:>12,.0f} {seconds:>8.1f} {cpu:>8.1f} {code:>5}",
                  flush=True)


if __name__ == "__main__":
    main()
