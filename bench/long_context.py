"""Long sequences on CPU: peak memory of one training step, msov against Trainer + PEFT, and msov's plan.

A Mistral-shaped model (hidden 1024, GQA 16/4 heads, SwiGLU 3584, vocab 32768; 2 layers by default, fewer than
Mistral's 32 so that a 16k-token step takes minutes on 2 cores), LoRA r=16 on all seven projections, fp32,
gradient checkpointing on, AdamW, batch 1. Each run is its own child process; its peak is the growth of the
process's peak RSS over the step (weights included, loading and code pages not), as tests/test_plan.py measures.

  msov            train/trainer.py's Trainer: two documents of L/2 tokens packed into one row of L (a block-
                  diagonal SDPA mask), the LM head and loss in chunks, MLPs tiled in the recompute.
  Trainer + PEFT  transformers.Trainer on the same L tokens as one row, the model's own loss (logits over the
                  whole vocabulary for every position), gradient checkpointing (non-reentrant).

The plan column is `msov plan` for the msov run (batch 1 x L, data packed): its peak plus what it would offload
(on CPU offloading is a no-op, so the layer inputs stay in this memory either way).

    python bench/long_context.py                    # 4k, 8k, 16k tokens
    python bench/long_context.py --lengths 4096 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = r"""
import json, sys, time
from pathlib import Path
mode, folder, length, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
from mistral_sov.guard.env import enforce_offline_env
enforce_offline_env()
import torch, transformers.trainer  # noqa: F401 - code pages are not training memory: import before the baseline
from datasets import Dataset
from transformers import AutoTokenizer
TARGETS = %(targets)r
tokenizer = AutoTokenizer.from_pretrained(folder)
vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
g = torch.Generator().manual_seed(0)
docs = [torch.randint(3, vocab, (length // 2,), generator=g).tolist() for _ in range(2)]
def labelled(ids):  # the first eighth of each document is prompt
    return [-100] * (len(ids) // 8) + ids[len(ids) // 8:]
planned = None
if mode == "msov":
    from mistral_sov.model.memory import plan_recipe
    from mistral_sov.recipe import Recipe
    recipe = Recipe.model_validate({"name": "bench", "model": {"path": folder, "attn_implementation": "sdpa"},
        "data": {"train": [{"path": "unused.jsonl"}]}, "output": {"dir": str(work / "out")},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "train": {"batch_size": 1, "max_seq_len": length, "gradient_checkpointing": True, "max_steps": 1}})
    memory = plan_recipe(recipe, gpu_mem="1000GB")["memory"]
    planned = memory["peak"] + memory["offloaded_to_host"]
    rows = Dataset.from_list([{"input_ids": d, "labels": labelled(d)} for d in docs])
else:
    rows = Dataset.from_list([{"input_ids": docs[0] + docs[1], "labels": labelled(docs[0]) + labelled(docs[1])}])
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
before, code_before = status("VmRSS"), status("RssFile")
if mode == "msov":
    from mistral_sov.model.load import attach_lora, inspect_model_folder, load_model
    from mistral_sov.recipe import ModelSection, TrainSection
    from mistral_sov.train.trainer import build_trainer
    model = attach_lora(load_model(inspect_model_folder(folder), recipe.model), recipe.lora)
    # two rows of L/2 packed into one bin of L: batch_size 2 rows, one sequence of L tokens
    settings = TrainSection(batch_size=2, max_seq_len=length, max_steps=1, gradient_checkpointing=True,
                            save_steps=1000, logging_steps=1)
    trainer = build_trainer(model, tokenizer, rows, None, settings, work, lambda *a: None)
else:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(work), per_device_train_batch_size=1, max_steps=1, use_cpu=True,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                             report_to=[], save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
with torch.no_grad():  # off the safetensors mmap into process memory, where a GPU would hold the weights too
    for p in [*model.parameters(), *model.buffers()]:
        p.data = p.data.clone()
import gc; gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # reset the peak: count the training step, not the loading
started = time.monotonic()
trainer.train()
seconds = time.monotonic() - started
code = status("RssFile") - code_before
print(json.dumps({"measured": status("VmHWM") - before - code, "planned": planned, "seconds": seconds}))
""" % {"targets": TARGETS}


def build_model(folder: Path, *, layers: int, hidden: int, vocab: int) -> Path:
    """A random-init Mistral-shaped model in `folder`, with the tiny model's tokenizer files (ids are random)."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_sov.tools.tiny import build_tiny_model

    tiny = build_tiny_model(folder.parent / "tiny", seed=0)
    folder.mkdir(parents=True)
    for file in tiny.iterdir():
        if "token" in file.name or file.name == "special_tokens_map.json":
            shutil.copy(file, folder / file.name)
    config = MistralConfig(hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, head_dim=64,
                           vocab_size=vocab, max_position_embeddings=65536, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def run(mode: str, folder: Path, length: int, work: Path, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "262144", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    work.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(length), str(work)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"error": f"exit {done.returncode}: {tail[0][:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="msov-long-") as tmp:
        folder = build_model(Path(tmp) / "model", layers=args.layers, hidden=args.hidden, vocab=args.vocab)
        print(f"model: Mistral shape, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; LoRA r=16 on "
              f"all projections, fp32, gradient checkpointing, batch 1, {args.threads} threads; peak RSS of one "
              "training step", flush=True)
        print("| tokens | msov peak | Trainer + PEFT peak | msov / baseline | plan (msov) | plan error | msov s | "
              "baseline s |", flush=True)
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for length in args.lengths:
            ours = run("msov", folder, length, Path(tmp) / f"msov-{length}", args.threads)
            base = run("hf", folder, length, Path(tmp) / f"hf-{length}", args.threads)
            print("| " + " | ".join(_row(length, ours, base)) + " |", flush=True)
    print(f"total {time.monotonic() - started:.0f} s", flush=True)


def _row(length: int, ours: dict, base: dict) -> list[str]:
    def mib(result):
        return result.get("error") or f"{result['measured'] / MiB:,.0f} MiB"

    cells = [f"{length:,}", mib(ours), mib(base)]
    both = "error" not in ours and "error" not in base
    cells.append(f"{ours['measured'] / base['measured']:.2f}" if both else "-")
    if "error" in ours:
        return cells + ["-", "-", "-", base.get("seconds") and f"{base['seconds']:.0f}" or "-"]
    cells += [f"{ours['planned'] / MiB:,.0f} MiB", f"{(ours['planned'] / ours['measured'] - 1) * 100:+.1f}%",
              f"{ours['seconds']:.0f}", f"{base['seconds']:.0f}" if "error" not in base else "-"]
    return cells


if __name__ == "__main__":
    main()
