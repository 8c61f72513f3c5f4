"""One GPU, one call: msov vs Trainer+PEFT vs TRL packed on a Mistral-7B-shaped random model (bench/gpu.sh runs it).

    python bench/gpu_bench.py --out gpu-results                  # QLoRA 4-bit and LoRA bf16, 7B shape, CUDA
    python bench/gpu_bench.py --device cpu --tiny --out /tmp/g   # the same code path on a tiny model (a dry run)

The model is tests/shapes/mistral-7b-instruct-v0.3's config with random weights (no download), written once as
safetensors so that every arm loads it the way a user would (msov through its own loader, the others through
`from_pretrained`). The rows are bench/throughput.py's long-tailed chats. Each arm runs in its own process (its
peak memory is its own), for `--warmup` steps and then `--steps` timed steps, under a time limit.

Per arm: supervised tokens/s over the timed steps, torch.cuda.max_memory_allocated, mean loss of the timed steps.
Written to OUT/gpu-results.json and OUT/gpu-results.txt.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
SHAPE = REPO / "tests" / "shapes" / "mistral-7b-instruct-v0.3" / "config.json"
# msov_rowattn: msov with attention row by row inside packed bins (mistral_sov.data.packing.packed_sdpa_attention),
# measured here to decide whether it should be msov's default on GPUs too (it is a loop of small kernels there).
ARMS = ["msov", "peft", "trl_packed", "msov_rowattn"]
MODES = ["qlora", "lora"]


def build_model(work: Path, args) -> None:
    """The 7B-shaped (or, with --tiny, a 2-layer) random model in bf16 with the bench's tokenizer, on disk."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    config = MistralConfig(**{k: v for k, v in json.loads(SHAPE.read_text()).items()
                              if k not in ("architectures", "model_type", "transformers_version")})
    if args.tiny:
        config.update(dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16))
    elif args.layers:
        config.num_hidden_layers = args.layers
    tokenizer = AutoTokenizer.from_pretrained(work / "small-model")
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.initializer_range = 0.02
    device = torch.device(args.device)
    with device:  # initialised on the GPU: seconds, where a CPU init of 7B parameters takes minutes
        torch.manual_seed(args.seed)
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    del model


def prepare(work: Path, args) -> None:
    import throughput

    small = argparse.Namespace(seed=args.seed, hidden=64, layers=1, vocab=1024 if args.tiny else 32768,
                               rows=args.rows, median_words=48.0, sigma=0.9, max_seq_len=args.max_seq_len)
    throughput.prepare(work, small)  # tokenizer (a 32k BPE) and tokenised rows; its model is only a tokenizer box
    os.replace(work / "model", work / "small-model")
    build_model(work, args)


def load_base(work: Path, args, mode: str, msov: bool):
    import torch

    if msov:
        from mistral_sov.model.load import inspect_model_folder, load_model
        from mistral_sov.recipe import ModelSection, QuantizationSection

        folder = inspect_model_folder(str(work / "model"))
        return load_model(folder, ModelSection(path=str(folder.path), dtype="bfloat16"),
                          quantization=QuantizationSection() if mode == "qlora" else None)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if mode == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": args.device} if quant else None)
    if quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model.to(args.device) if not quant else model


def common_args(args, out: Path) -> dict:
    on_gpu = args.device != "cpu"
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, learning_rate=2e-4,
                max_steps=args.warmup + args.steps, lr_scheduler_type="constant", seed=args.seed, data_seed=args.seed,
                logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not on_gpu,
                bf16=on_gpu, gradient_checkpointing=False)


def build(work: Path, args, arm: str, mode: str):
    import datasets
    from transformers import AutoTokenizer, set_seed

    import throughput

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    dataset = datasets.load_from_disk(str(work / "tokens"))
    set_seed(args.seed)
    if arm.startswith("msov"):
        from mistral_sov.model.load import attach_lora
        from mistral_sov.recipe import LoraSection, TrainSection
        from mistral_sov.train.trainer import build_trainer

        base = load_base(work, args, mode, msov=True)
        if arm == "msov_rowattn":
            from mistral_sov.data.packing import register_packed_attention

            base.set_attn_implementation(register_packed_attention())
        model = attach_lora(base, LoraSection())
        train = TrainSection(batch_size=args.batch_size, lr=2e-4, max_seq_len=args.max_seq_len, seed=args.seed,
                             logging_steps=1, save_steps=10 ** 9, max_steps=args.warmup + args.steps,
                             scheduler="constant", dtype="bf16" if args.device != "cpu" else "fp32")
        (work / f"out-{arm}-{mode}").mkdir(exist_ok=True)
        return build_trainer(model, tokenizer, dataset, None, train, work / f"out-{arm}-{mode}", lambda *_: None)
    from peft import LoraConfig

    lora = throughput._lora(LoraConfig)
    if arm == "peft":
        from peft import get_peft_model
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        model = get_peft_model(load_base(work, args, mode, msov=False), lora)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
        return Trainer(model=model, args=TrainingArguments(**common_args(args, work / f"out-{arm}-{mode}")),
                       train_dataset=dataset, data_collator=collator, processing_class=tokenizer)
    from trl import SFTConfig, SFTTrainer

    model = load_base(work, args, mode, msov=False)
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    pairs = throughput.prompt_completion_pairs(rows, tokenizer)
    # One pack of up to max_seq_len tokens per step holds about the rows of the others' batch of 8 (as in
    # bench/throughput.py's trl_packed arm): about as many optimizer steps, comparable losses.
    common = {**common_args(args, work / f"out-{arm}-{mode}"), "per_device_train_batch_size": 1}
    config = SFTConfig(**common, max_length=args.max_seq_len, packing=True)
    return SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                      processing_class=tokenizer, peft_config=lora)


def run_arm(work: Path, args, arm: str, mode: str) -> dict:
    """One arm, in this process: warm-up steps, then timed steps (the GPU synchronised at both ends)."""
    import torch
    from transformers import PrinterCallback, TrainerCallback

    from mistral_sov.guard.env import enforce_offline_env

    enforce_offline_env()
    started = time.perf_counter()
    trainer = build(work, args, arm, mode)
    trainer.remove_callback(PrinterCallback)
    collate, counted = trainer.data_collator, {"supervised": 0, "tokens": 0, "on": False}

    def counting(features):
        batch = collate(features)
        if counted["on"]:
            counted["supervised"] += int((batch["labels"][..., 1:] != -100).sum())
            counted["tokens"] += sum(len(f["input_ids"]) for f in features)
        return batch

    trainer.data_collator = counting
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    clock: dict = {}

    class Timed(TrainerCallback):
        # The batch of step k+1 is collated before its on_step_begin: counting starts at the end of the warm-up.
        def on_step_end(self, a, state, control, **k):
            if state.global_step == args.warmup:
                sync()
                clock["start"], counted["on"] = time.perf_counter(), True
            elif state.global_step == args.warmup + args.steps:
                sync()
                clock["seconds"] = time.perf_counter() - clock["start"]

    trainer.add_callback(Timed())
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e][args.warmup:]
    return {"arm": arm, "mode": mode, "steps_timed": args.steps, "seconds": clock["seconds"],
            "supervised_tokens": counted["supervised"], "tokens": counted["tokens"],
            "supervised_tokens_per_s": counted["supervised"] / clock["seconds"],
            "tokens_per_s": counted["tokens"] / clock["seconds"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if args.device != "cpu" else None,
            "mean_loss_timed": sum(losses) / max(len(losses), 1), "wall_with_load_s": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden 64 (a dry run of the code)")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the 7B shape's 32 (0: all)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arm-timeout", type=int, default=75, help="seconds per arm, loading included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="(internal) the prepared folder")
    parser.add_argument("--one", help="(internal) run one ARM:MODE in this process and print its JSON")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    if args.one:
        arm, mode = args.one.split(":")
        print("RESULT " + json.dumps(run_arm(args.work, args, arm, mode)), flush=True)
        return 0
    from mistral_sov.guard.env import enforce_offline_env

    enforce_offline_env()
    args.out.mkdir(parents=True, exist_ok=True)
    results, lines = [], []
    with tempfile.TemporaryDirectory(prefix="msov-gpu-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        prepare(work, args)
        lines.append(f"model ready in {time.perf_counter() - started:.0f} s")
        try:
            import trl  # noqa: F401
            has_trl = True
        except ImportError:
            has_trl = False
        for mode in args.modes.split(","):
            for arm in args.arms.split(","):
                if arm == "trl_packed" and not has_trl:
                    lines.append(f"{mode} {arm}: skipped (trl is not importable here)")
                    continue
                if mode == "qlora" and args.device == "cpu":
                    lines.append(f"{mode} {arm}: skipped (bitsandbytes 4-bit training is a CUDA path)")
                    continue
                cmd = [sys.executable, __file__, "--one", f"{arm}:{mode}", "--work", str(work), "--device",
                       args.device, "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.arm_timeout)
                except subprocess.TimeoutExpired:
                    lines.append(f"{mode} {arm}: stopped after {args.arm_timeout} s")
                    continue
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not found:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    lines.append(f"{mode} {arm}: failed ({proc.returncode}): " + " | ".join(tail))
                    continue
                results.append(json.loads(found[-1][len("RESULT "):]))
                lines.append(summary(results[-1], results))
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (args.out / "gpu-results.txt").write_text(text + "\n")
    (args.out / "gpu-results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=2) + "\n")
    return 0


def summary(r: dict, results: list[dict]) -> str:
    peers = {x["arm"]: x for x in results if x["mode"] == r["mode"]}
    ratio = ", ".join(f"{r['supervised_tokens_per_s'] / p['supervised_tokens_per_s']:.2f}x {name}"
                      for name, p in peers.items() if name != r["arm"])
    memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
    return (f"{r['mode']:<6}{r['arm']:<11}{r['supervised_tokens_per_s']:>9.0f} sup tok/s {r['tokens_per_s']:>9.0f} "
            f"tok/s  peak {memory:>10}  loss {r['mean_loss_timed']:.4f}  load+run {r['wall_with_load_s']:.0f} s"
            + (f"  ({ratio})" if ratio else ""))


if __name__ == "__main__":
    sys.exit(main())
