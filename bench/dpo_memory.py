"""Peak memory of preference tuning against SFT: does DPO hold a second model? (It should not.)

    python bench/dpo_memory.py                       # 57M-parameter Mistral-architecture model, 10 steps each
    python bench/dpo_memory.py --hidden 512 --layers 4 --steps 6

Every arm is one `msov finetune` (the library call) in its own child process, on the same model, the same
preference pairs (data_samples/preference/) and the same number of optimizer steps, batch 4:

  load        the model loaded with LoRA attached, no training: what every arm pays before its first step
  sft         SFT on the pairs' chosen conversations (prompt + chosen answer), msov's defaults (packing on)
  sft_rows    SFT on both answers' conversations, 8 rows a step, unpacked: the rows a DPO step of 4 pairs holds
  dpo         DPO, the reference computed live: the base with the adapter off (no second copy of the weights)
  dpo_precomp DPO with train.precompute_ref: reference log-probs computed once before training
  dpo_adapter DPO from an SFT adapter (model.adapter): the reference is that adapter, loaded a second time as a
              frozen adapter on the same base
  orpo        ORPO: no reference at all

The peak RSS of each child is read from os.wait4 (its own ru_maxrss, not the largest of all children so far) and
printed with its ratio to the SFT arm, beside the size of the model's weights: a second model would add that much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "data_samples" / "preference" / "helpdesk_pairs.jsonl"
ARMS = ("load", "sft", "sft_rows", "dpo", "dpo_precomp", "dpo_adapter", "orpo")


def recipe(arm: str, work: Path, steps: int) -> dict:
    method = {"sft": "sft", "sft_rows": "sft", "load": "sft", "orpo": "orpo"}.get(arm, "dpo")
    chats = "both.jsonl" if arm == "sft_rows" else "chats.jsonl"
    data = {"train": [{"path": str(work / (chats if method == "sft" else "pairs.jsonl"))}],
            "packing": arm != "sft_rows"}
    out = {"name": f"mem-{arm}", "model": {"path": str(work / "model")}, "data": data,
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
           "train": {"method": method, "max_steps": steps, "batch_size": 8 if arm == "sft_rows" else 4,
                     "lr": 1e-3, "max_seq_len": 256, "group_by_length": False,
                     "seed": 0, "logging_steps": 1, "save_steps": 10_000, "precompute_ref": arm == "dpo_precomp"},
           "output": {"dir": str(work / "runs" / arm)}}
    if arm == "dpo_adapter":
        out["model"]["adapter"] = str(work / "runs" / "sft" / "adapter")
    return out


def child(arm: str, work: Path, steps: int) -> None:
    """One arm, in this process: print its record's summary as one JSON line."""
    import torch

    from mistral_sov.recipe import validate_recipe

    torch.set_num_threads(int(os.environ.get("MSOV_BENCH_THREADS", "2")))
    config = validate_recipe(recipe(arm, work, steps))
    if arm == "load":
        from mistral_sov.model.load import attach_lora, inspect_model_folder, load_model, parameter_counts

        folder = inspect_model_folder(config.model.path)
        model = attach_lora(load_model(folder, config.model), config.lora)
        print(json.dumps({"arm": arm, "parameters": parameter_counts(model)[1]}))
        return
    from mistral_sov.train.pipeline import finetune

    record = finetune(config)
    print(json.dumps({"arm": arm, "parameters": record.parameters.total, "steps": record.train.steps,
                      "first_loss": record.train.first_loss, "final_loss": record.train.final_loss}))


def prepare(work: Path, hidden: int, layers: int) -> None:
    from mistral_sov.tools.tiny import build_tiny_model

    build_tiny_model(work / "model", seed=0, hidden_size=hidden, num_layers=layers)
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    (work / "pairs.jsonl").write_text(PAIRS.read_text())
    def chats(answers):
        return "".join(json.dumps({"messages": [{"role": "user", "content": p["prompt"]},
                                                {"role": "assistant", "content": p[answer]}]}) + "\n"
                       for p in pairs for answer in answers)

    (work / "chats.jsonl").write_text(chats(["chosen"]))
    (work / "both.jsonl").write_text(chats(["chosen", "rejected"]))


def run_arm(arm: str, work: Path, steps: int) -> dict:
    process = subprocess.Popen([sys.executable, __file__, "--child", arm, "--work", str(work), "--steps", str(steps)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 returns this child's own rusage; RUSAGE_CHILDREN would be the largest child so far
    out, err = process.stdout.read(), process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"arm {arm} failed ({process.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.work, args.steps)
        return 0
    arms = args.arms.split(",")
    if "dpo_adapter" in arms and "sft" in arms and arms.index("sft") > arms.index("dpo_adapter"):
        raise SystemExit("dpo_adapter starts from the sft arm's adapter: list sft first")
    with tempfile.TemporaryDirectory(prefix="msov-dpo-mem-") as tmp:
        work = Path(tmp)
        prepare(work, args.hidden, args.layers)
        results = {arm: run_arm(arm, work, args.steps) for arm in arms}
    params = next(iter(results.values()))["parameters"]
    weights = params * 4 / 2**20
    print(f"model: Mistral architecture, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), "
          f"float32 weights {weights:.0f} MiB; {args.steps} steps, batch 4 (pairs or rows), LoRA r 16, CPU")
    sft = results.get("sft", {}).get("peak_rss_mib")
    print(f"{'arm':<12} {'peak RSS':>10} {'vs sft':>7} {'- sft':>9}  final loss")
    for arm, result in results.items():
        rss = result["peak_rss_mib"]
        ratio = f"{rss / sft:.2f}" if sft else "-"
        delta = f"{rss - sft:+.0f} MiB" if sft else "-"
        loss = result.get("final_loss")
        print(f"{arm:<12} {rss:>6.0f} MiB {ratio:>7} {delta:>9}  {loss if loss is None else round(loss, 4)}")
    print(f"(a second copy of the model would add about {weights:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
