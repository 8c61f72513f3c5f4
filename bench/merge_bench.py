"""Streamed merge (msov) against PEFT's merge_and_unload: peak RSS and wall time, same model, same run.

    .venv/bin/python bench/merge_bench.py [--size-gb 2.5] [--shard-size 1GB] [--workdir DIR] [--keep]

Builds a Mistral-architecture model of about --size-gb in float32 (random weights, written in several shards)
and a rank-16 LoRA adapter on every projection, then runs each method in its own fresh process (after a sync,
so that none pays for another's writeback) and reads that process's peak RSS and CPU time from the kernel
(os.wait4's rusage); wall time is measured inside the process, around the merge and the save only. A third
process that only imports the libraries gives the floor every method pays. Finally every tensor of the two
outputs is compared.

Targets (issue #4): streamed peak RSS <= 1.5 x the largest base shard; streamed time <= merge_and_unload's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMPORTS = "import torch, transformers, peft, safetensors\n"

BUILD = IMPORTS + """
import math, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM
base, adapter, size_gb, shard = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
hidden, vocab = 2048, 32000
per_layer = 4 * (3 * hidden * hidden + 9 * hidden * hidden) + 8 * hidden  # attention 3h^2, MLP 9h^2, fp32
layers = max(1, round((size_gb * 1e9 - 8 * vocab * hidden) / per_layer))
config = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
with torch.device("meta"):
    model = MistralForCausalLM(config)
model.to_empty(device="cpu")
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.save_pretrained(base, max_shard_size=shard)
lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
get_peft_model(model, lora).save_pretrained(adapter)
print(layers)
"""

STREAMED = IMPORTS + """
import sys, time
from mistral_sov.export.stream_merge import merge_into
from mistral_sov.sizes import parse_size
base, adapter, out, shard = sys.argv[1:5]
started = time.monotonic()
merge_into(base, adapter, out, shard_size=parse_size(shard, option="--shard-size"))
print(time.monotonic() - started)
"""

BASELINE = IMPORTS + """
import sys, time, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, shard = sys.argv[1:5]
started = time.monotonic()
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size=shard)
print(time.monotonic() - started)
"""

COMPARE = """
import json, sys
from pathlib import Path
from safetensors import safe_open
def where(folder):
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return {k: Path(folder) / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(Path(folder) / "model.safetensors", "pt") as f:
        return {k: Path(folder) / "model.safetensors" for k in f.keys()}
a, b = where(sys.argv[1]), where(sys.argv[2])
assert set(a) == set(b), set(a) ^ set(b)
worst = 0.0
for name in a:
    with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
        worst = max(worst, (fa.get_tensor(name) - fb.get_tensor(name)).abs().max().item())
print(worst)
"""


def run(code: str, *args) -> tuple[str, float, int]:
    """stdout, CPU seconds (user + system) and peak RSS (bytes) of a fresh Python process running `code`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    os.sync()  # no method pays for the previous one's dirty pages being written back
    process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, env=env)
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not every child's so far
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"a bench step failed (exit {process.returncode})")
    return output.strip(), usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.5)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/msov-merge-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the model and outputs")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    base, adapter = work / "base", work / "adapter"
    streamed_out, baseline_out = work / "streamed", work / "baseline"
    streamed_out.mkdir(parents=True)
    try:
        started = time.monotonic()
        output, _, _ = run(BUILD, base, adapter, args.size_gb, args.shard_size)
        layers, build_s = output.splitlines()[-1], time.monotonic() - started
        shards = sorted(base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards)
        total = sum(p.stat().st_size for p in shards)
        print(f"model: {layers} layers, {total / 1e9:.2f} GB fp32 in {len(shards)} shards (largest "
              f"{largest / 1e9:.2f} GB), LoRA r=16 on 7 projections; built in {build_s:.0f} s")
        _, _, floor = run(IMPORTS)
        results = {}
        for label, code, out in (("streamed (msov)", STREAMED, streamed_out),
                                 ("merge_and_unload", BASELINE, baseline_out)):
            output, cpu, peak = run(code, base, adapter, out, args.shard_size)
            results[label] = (float(output.splitlines()[-1]), cpu, peak)
        output, _, _ = run(COMPARE, streamed_out, baseline_out)
        worst = output.splitlines()[-1]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'method':18} {'wall':>8} {'CPU':>8} {'peak RSS':>10} {'x largest shard':>16}")
    for label, (seconds, cpu, peak) in results.items():
        print(f"{label:18} {seconds:7.1f}s {cpu:7.1f}s {peak / 1e9:8.2f}GB {peak / largest:15.2f}x")
    print(f"{'imports only':18} {'':>8} {'':>8} {floor / 1e9:8.2f}GB {floor / largest:15.2f}x")
    (s_time, s_cpu, s_peak), (b_time, b_cpu, b_peak) = results["streamed (msov)"], results["merge_and_unload"]
    print(f"streamed / baseline: wall {s_time / b_time:.2f}x, CPU {s_cpu / b_cpu:.2f}x (process total, imports "
          f"included), peak RSS {s_peak / b_peak:.2f}x; max |difference| between the outputs: {float(worst):.2e}")
    print(f"target peak <= 1.5 x largest shard: {'met' if s_peak <= 1.5 * largest else 'MISSED'}; "
          f"target time <= baseline: {'met' if s_time <= b_time else 'MISSED'} (wall time; on a shared machine "
          f"compare CPU too)")
    print(json.dumps({"largest_shard": largest, "total": total, "imports_rss": floor,
                      **{k: {"seconds": v[0], "cpu_seconds": v[1], "peak_rss": v[2]} for k, v in results.items()},
                      "max_abs_diff": float(worst)}))


if __name__ == "__main__":
    main()
