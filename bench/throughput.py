"""Supervised tokens per second: msov against the script a user would write instead, side by side, one run.

    python bench/throughput.py                 # 23M Mistral-architecture model, 256 length-skewed chats
    python bench/throughput.py --rows 1024     # longer, steadier
    python bench/throughput.py --json out.json

Every arm trains the same LoRA on the same tokenised rows, in the same order, for one epoch: the same supervised
tokens and the same number of optimizer steps. Arms:

  baseline   transformers.Trainer + PEFT, DataCollatorForSeq2Seq padding to the longest row of each batch
  trl        TRL's SFTTrainer with its defaults (prompt-completion rows; float32 like the others), only where
             `trl` is importable (it is not a dependency of msov: install it in a separate venv to run this arm)
  trl_packed TRL's SFTTrainer with packing=True (its default "bfd" strategy, which is padding-free): the best peer
             a well-read user would pick; float32, same LoRA, same rows. TRL packs the rows into max_seq_len
             blocks before training; its batch is --trl-packs-per-step blocks (1: about the rows of the others'
             batch, so about as many optimizer steps)
  msov       mistral_sov.train.trainer.build_trainer with msov's defaults (packing on)
  (ablations, with --arms: packing_only = the baseline with msov's packed batches but logits everywhere;
   msov_rowattn = the msov arm with attention computed row by row inside each packed bin
   (mistral_sov.data.packing.packed_sdpa_attention) instead of SDPA over a dense block-diagonal mask;
   --msov-no-packing = the msov arm with data.packing off, i.e. length-grouped padded batches)

Each arm runs in its own process (so its peak RSS is its own) and the arms take turns step by step: on a shared
machine every arm sees the same background load. Each arm's clock runs only during its own turns.

Reported: supervised tokens/s (label != -100) per arm and the ratio to the baseline, the share of each arm's
batches that was padding, peak RSS, the mean training loss over the whole epoch and over its last 20% of steps,
and model FLOPs utilisation against a float32 matrix-multiply peak measured in the same run. Model FLOPs are the
work a step cannot avoid, counted as `msov finetune` records them (mistral_sov/model/compute.py): frozen weights 4
FLOPs per parameter per token (forward + input gradient), LoRA weights 6, the LM head only at supervised positions,
causal attention within each row, no padding.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import random
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# --- data and model ----------------------------------------------------------------------------------------------


def lexicon(seed: int) -> tuple[list[str], list[float]]:
    """Made-up words with Zipf frequencies: enough distinct words for a 32k-token BPE, like a real vocabulary."""
    rng = random.Random(seed)
    onset = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
             "st", "tr", "pl", "gr", "sh", "ch", "br", "kl"]
    nucleus = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io", "y"]
    coda = ["", "n", "r", "s", "t", "l", "m", "x", "nd", "rt", "st", "ng", "ck"]
    words = sorted({"".join(rng.choice(onset) + rng.choice(nucleus) + rng.choice(coda)
                            for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))) for _ in range(120_000)})
    rng.shuffle(words)
    return words, [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]


def chat_rows(n: int, words, weights, seed: int, median: float, sigma: float, max_words: int) -> list[dict]:
    """Single-turn chats whose length (in words) is log-normal: many short rows, a long tail."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = int(min(max_words, max(8, rng.lognormvariate(math.log(median), sigma))))
        prompt = max(2, int(total * rng.uniform(0.35, 0.75)))
        text = rng.choices(words, weights=weights, k=total)
        rows.append({"messages": [{"role": "user", "content": " ".join(text[:prompt])},
                                  {"role": "assistant", "content": " ".join(text[prompt:]) or "ok"}]})
    return rows


def prepare(work: Path, args) -> dict:
    """Tokenizer and model (built locally), tokenised rows saved to disk for the arms to load."""
    from mistral_sov.data import tokenize_records
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer
    from mistral_sov.tools.tiny import build_tiny_model

    words, weights = lexicon(args.seed)
    corpus = work / "corpus"
    corpus.mkdir()
    rng = random.Random(args.seed + 1)
    with open(corpus / "corpus.jsonl", "w") as f:
        for _ in range(30_000):
            f.write(json.dumps({"text": " ".join(rng.choices(words, weights=weights, k=50))}) + "\n")
    build_tiny_model(work / "model", seed=args.seed, data_dir=corpus, hidden_size=args.hidden,
                     num_layers=args.layers, vocab_size=args.vocab)
    tokenizer = load_tokenizer(inspect_model_folder(str(work / "model")))
    # ~1.25 tokens per word with this vocabulary: median ~60 tokens, tail cut at max_seq_len.
    rows = chat_rows(args.rows, words, weights, args.seed + 2, median=args.median_words, sigma=args.sigma,
                     max_words=args.max_seq_len)
    data = tokenize_records(rows, tokenizer, max_seq_len=args.max_seq_len)
    data.dataset.save_to_disk(str(work / "tokens"))
    with open(work / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return data.stats.as_dict()


def model_flops(config, trainable: int, lengths_and_supervised: list[tuple[int, int]]) -> float:
    """FLOPs a training step cannot avoid for these rows: msov's own count (mistral_sov/model/compute.py), the one
    `msov finetune` records, with no padding (each row's own length)."""
    from mistral_sov.model.compute import ModelShape, causal_pairs, training_flops

    return training_flops(ModelShape.from_config(config), trainable=trainable,
                          tokens=sum(length for length, _ in lengths_and_supervised),
                          supervised=sum(supervised for _, supervised in lengths_and_supervised),
                          attention_pairs=sum(causal_pairs(length) for length, _ in lengths_and_supervised))


def matmul_peak(seconds: float = 3.0, n: int = 1024) -> float:
    """Best float32 GEMM rate over short repeats (FLOP/s): the machine's practical peak right now."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    torch.mm(a, b)
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - start))
    return best


# --- the arms ----------------------------------------------------------------------------------------------------


def _lora(peft_config_cls, dropout: float | None = None):
    from mistral_sov.recipe import LoraSection

    section = LoraSection()  # msov's defaults, for every arm
    if dropout is not None:
        section.dropout = dropout
    return peft_config_cls(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                           target_modules=section.target_modules, task_type="CAUSAL_LM")


def _args_common(args, out: Path) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                num_train_epochs=1, lr_scheduler_type="cosine", seed=args.seed, data_seed=args.seed,
                logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True)


def build_baseline(work: Path, args, dataset, tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)  # the same LoRA initialisation in every arm
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model = get_peft_model(model, _lora(LoraConfig, args.lora_dropout))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return Trainer(model=model, args=TrainingArguments(**_args_common(args, work / "out-baseline")),
                   train_dataset=dataset, data_collator=collator, processing_class=tokenizer)


def build_packing_only(work: Path, args, dataset, tokenizer):
    """Ablation: the baseline with msov's packed batches, but HF's loss (logits at every position)."""
    from mistral_sov.data.packing import PackingCollator

    trainer = build_baseline(work, args, dataset, tokenizer)
    trainer.data_collator = PackingCollator(pad_token_id=tokenizer.pad_token_id, max_seq_len=args.max_seq_len)
    return trainer


def build_msov(work: Path, args, dataset, tokenizer, row_attention: bool = False):
    from transformers import set_seed

    from mistral_sov.model.load import attach_lora, inspect_model_folder, load_model
    from mistral_sov.recipe import LoraSection, ModelSection, TrainSection
    from mistral_sov.train.trainer import build_trainer

    set_seed(args.seed)  # as `msov finetune` does before loading the model
    folder = inspect_model_folder(str(work / "model"))
    lora = LoraSection() if args.lora_dropout is None else LoraSection(dropout=args.lora_dropout)
    base = load_model(folder, ModelSection(path=str(folder.path)))
    if row_attention:
        from mistral_sov.data.packing import register_packed_attention

        base.set_attn_implementation(register_packed_attention())
    model = attach_lora(base, lora)
    train = TrainSection(batch_size=args.batch_size, lr=args.lr, max_seq_len=args.max_seq_len, seed=args.seed,
                         logging_steps=1, save_steps=10 ** 9)
    (work / "out-msov").mkdir(exist_ok=True)
    return build_trainer(model, tokenizer, dataset, None, train, work / "out-msov", lambda *_: None,
                         packing=not args.msov_no_packing)


def build_msov_rowattn(work: Path, args, dataset, tokenizer):
    return build_msov(work, args, dataset, tokenizer, row_attention=True)


def prompt_completion_pairs(rows: list[dict], tokenizer) -> list[dict]:
    """The same conversations as prompt + completion text, so that TRL's default completion-only loss applies."""
    from mistral_sov.data import render_prompt

    pairs = []
    for row in rows:
        prompt = render_prompt(row["messages"][:-1], tokenizer)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        pairs.append({"prompt": prompt, "completion": full[len(prompt):]})
    return pairs


def build_trl(work: Path, args, dataset, tokenizer, packing: bool = False):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    pairs = prompt_completion_pairs(rows, tokenizer)
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    # TRL's defaults, except float32 like every other arm (its default on CPU is bf16 autocast, other numbers).
    # packing=True takes TRL's default strategy, "bfd", which turns padding_free on.
    common = _args_common(args, work / ("out-trl-packed" if packing else "out-trl"))
    if packing:  # a batch of packs, each up to max_seq_len tokens (see --trl-packs-per-step)
        common["per_device_train_batch_size"] = args.trl_packs_per_step
    config = SFTConfig(**common, max_length=args.max_seq_len, bf16=False, packing=packing)
    return SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                      processing_class=tokenizer, peft_config=_lora(LoraConfig, args.lora_dropout))


def build_trl_packed(work: Path, args, dataset, tokenizer):
    return build_trl(work, args, dataset, tokenizer, packing=True)


BUILDERS = {"baseline": build_baseline, "trl": build_trl, "trl_packed": build_trl_packed,
            "packing_only": build_packing_only, "msov": build_msov, "msov_rowattn": build_msov_rowattn}


def _supervised_in_row(feature: dict) -> int:
    if "labels" in feature:
        return sum(x != -100 for x in feature["labels"][1:])
    if "completion_mask" in feature:  # TRL's prompt-completion rows
        return sum(feature["completion_mask"][1:])
    return len(feature["input_ids"]) - 1


def run_arm(arm: str, index: int, work: str, args, turns, done, barrier, results) -> None:
    """One arm in its own process; its clock runs only between receiving and passing the turn."""
    from mistral_sov.guard.env import enforce_offline_env

    enforce_offline_env()
    warnings.filterwarnings("ignore")  # library deprecation chatter; the bench's output is the table
    import datasets
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    _threads(args.threads)
    work = Path(work)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    trainer = BUILDERS[arm](work, args, datasets.load_from_disk(str(work / "tokens")), tokenizer)
    counts = {"supervised": 0, "real": 0, "processed": 0, "rows": []}
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        counts["supervised"] += int((batch["labels"][..., 1:] != -100).sum())
        counts["processed"] += batch["input_ids"].numel()
        for f in features:  # TRL's features are its own tokenisation; count what each arm really trains on
            counts["real"] += len(f["input_ids"])
            if "seq_lengths" in f:  # a TRL pack: its rows attend within themselves (the FLOPs need the lengths)
                lengths = list(f["seq_lengths"])
                counts["rows"] += [(lengths[0], _supervised_in_row(f))] + [(n, 0) for n in lengths[1:]]
            else:
                counts["rows"].append((len(f["input_ids"]), _supervised_in_row(f)))
        return batch

    trainer.data_collator = counting_collator
    trainer.remove_callback(PrinterCallback)  # no arm prints its logs (msov's Trainer never does)
    clock = {"busy": 0.0, "since": 0.0}

    def wait():
        turns[index].acquire()
        clock["since"] = time.perf_counter()

    def hand_over():
        clock["busy"] += time.perf_counter() - clock["since"]
        n = len(turns)
        nxt = next((k % n for k in range(index + 1, index + n) if not done[k % n]), index)
        turns[nxt].release()

    class TakeTurns(TrainerCallback):
        def on_train_begin(self, *a, **k):
            wait()

        def on_step_end(self, *a, **k):
            hand_over()
            wait()

        def on_train_end(self, *a, **k):
            done[index] = 1
            hand_over()

    trainer.add_callback(TakeTurns())
    barrier.wait()
    output = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tail = losses[-max(1, len(losses) // 5):]
    model = trainer.model
    results.put({
        "arm": arm, "seconds": clock["busy"], "steps": trainer.state.global_step,
        "supervised_tokens": counts["supervised"], "real_tokens": counts["real"],
        "processed_tokens": counts["processed"], "rows": counts["rows"],
        "train_loss": output.training_loss, "last_20pct_loss": sum(tail) / len(tail),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    })


# --- main --------------------------------------------------------------------------------------------------------


def add_workload_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model, data and training options shared with bench/profile_step.py (the same workload in both)."""
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--median-words", type=float, default=48.0, help="~60 tokens")
    parser.add_argument("--sigma", type=float, default=0.9, help="log-normal spread of row lengths")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768, help="Mistral's vocabulary size")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="default: msov's (0.05); 0 makes packed and padded runs step-for-step identical")
    parser.add_argument("--msov-no-packing", action="store_true", help="msov arm without packing (ablation)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per arm and for the matmul peak (0: torch's default). 1 by default: "
                             "the arms alternate anyway, and on a machine shared with other jobs a descheduled "
                             "thread stalls every multi-threaded op, which distorts the ratios")
    return parser


def main(argv=None) -> int:
    parser = add_workload_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--arms", default="baseline,trl,trl_packed,msov",
                        help="comma-separated: " + ", ".join(BUILDERS))
    parser.add_argument("--trl-packs-per-step", type=int, default=1,
                        help="trl_packed's batch, in packs of up to max_seq_len tokens: 1 pack holds about as many "
                             "rows as the other arms' batch of 8 (~10 rows of median 58 tokens), so the arms take "
                             "about as many optimizer steps and their losses compare; 8 packs per step means 8x "
                             "fewer steps and a flattened 8k-token sequence under one dense SDPA mask")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from mistral_sov.guard.env import enforce_offline_env

    enforce_offline_env()
    warnings.filterwarnings("ignore")
    import datasets

    datasets.disable_progress_bars()
    arms = [a for a in args.arms.split(",") if a]
    if any(a.startswith("trl") for a in arms):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed here: the TRL arms are skipped (install it in a separate venv to run them)")
            arms = [a for a in arms if not a.startswith("trl")]
    with tempfile.TemporaryDirectory(prefix="msov-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        stats = prepare(work, args)
        _threads(args.threads)
        peak_before = matmul_peak()
        ctx = mp.get_context("spawn")
        turns = [ctx.Semaphore(0) for _ in arms]
        done, barrier, results = ctx.Array("b", len(arms)), ctx.Barrier(len(arms)), ctx.Queue()
        procs = [ctx.Process(target=run_arm, args=(arm, i, str(work), args, turns, done, barrier, results))
                 for i, arm in enumerate(arms)]
        for p in procs:
            p.start()
        turns[0].release()
        out = {}
        while len(out) < len(arms):
            try:
                r = results.get(timeout=5)
                out[r["arm"]] = r
            except queue.Empty:
                dead = [arm for arm, p in zip(arms, procs) if p.exitcode not in (None, 0) and arm not in out]
                if dead:  # the others would wait for its turn forever
                    for p in procs:
                        p.terminate()
                    print(f"arm {', '.join(dead)} failed; see its traceback above", file=sys.stderr)
                    return 1
        for p in procs:
            p.join()
        peak = max(peak_before, matmul_peak())
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(work / "model")
        n_params = _count_params(config)

    report(out, arms, stats, config, n_params, peak, args, time.perf_counter() - started)
    return 0


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _count_params(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def report(out: dict, arms: list[str], stats: dict, config, n_params: int, peak: float, args, wall: float):
    base = out.get("baseline")
    print(f"model: Mistral architecture, {n_params / 1e6:.1f}M parameters (hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, vocab {config.vocab_size}); LoRA r=16 on all linear layers")
    print(f"data: {stats['rows_out']} chat rows, {stats['tokens']} tokens (median {stats['median_len']:.0f}, "
          f"max {stats['max_len']}), {stats['supervised_tokens']} supervised; batch {args.batch_size} rows, "
          f"1 epoch, max_seq_len {args.max_seq_len}")
    import torch

    print(f"torch threads per arm: {args.threads or torch.get_num_threads()}")
    print(f"float32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s\n")
    packed = out.get("trl_packed")
    print(f"{'arm':<13}{'sup tok/s':>10}{'ratio':>8}{'vs TRL pk':>10}{'padding':>9}{'RSS MB':>8}{'loss':>8}"
          f"{'last20%':>9}{'MFU':>7}{'steps':>7}{'time s':>8}")
    results = {}
    for arm in arms:
        r = out[arm]
        rate = r["supervised_tokens"] / r["seconds"]
        flops = model_flops(config, r["trainable"], r["rows"])
        row = {"supervised_tokens_per_s": rate, "ratio_to_baseline": rate / (base["supervised_tokens"]
               / base["seconds"]) if base else None,
               "ratio_to_trl_packed": rate / (packed["supervised_tokens"] / packed["seconds"]) if packed else None,
               "padding_share": 1 - r["real_tokens"] / r["processed_tokens"],
               "mfu": flops / r["seconds"] / peak, **{k: v for k, v in r.items() if k != "rows"}}
        results[arm] = row
        ratio = f"{row['ratio_to_baseline']:.2f}x" if base else "-"
        vs_packed = f"{row['ratio_to_trl_packed']:.2f}x" if packed else "-"
        print(f"{arm:<13}{rate:>10.0f}{ratio:>8}{vs_packed:>10}{row['padding_share']:>9.0%}{r['peak_rss_mb']:>8.0f}"
              f"{r['train_loss']:>8.4f}{r['last_20pct_loss']:>9.4f}{row['mfu']:>7.1%}{r['steps']:>7}"
              f"{r['seconds']:>8.1f}")
    tokens = ", ".join(f"{a} {out[a]['supervised_tokens']}" for a in arms)
    print(f"\n(supervised tokens trained: {tokens}; bench wall time {wall:.0f} s; load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "data": stats,
                                         "parameters": n_params, "matmul_peak_flops": peak,
                                         "arms": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
