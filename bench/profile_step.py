"""Where one msov training step spends its time: torch.profiler (CPU) over a few steps of the bench model.

    python bench/profile_step.py                          # bench/throughput.py's default model and rows
    python bench/profile_step.py --hidden 1024 --layers 8 # the compute-bound model
    python bench/profile_step.py --trace step.json        # also a Chrome trace (chrome://tracing, Perfetto)

The model, rows and trainer are bench/throughput.py's msov arm (imported, not copied). After `--warmup` steps,
`--steps` steps run unprofiled (the wall time and MFU of a step) and then the same number again under the profiler.

Each op's own time (self CPU time) goes to one family. Forward ops are placed by the innermost module they run in
(scopes pushed by forward hooks); backward ops by the forward op that recorded their autograd node (sequence
number), so a GEMM's gradient lands with its GEMM. Families: frozen-weight GEMMs, LoRA A/B (dropout and scaling
included), attention kernels (SDPA), attention glue (RoPE, reshapes), the packed-row mask and positions, norms,
MLP activation, residual adds, embedding, LM head (supervised positions only), loss, optimizer, data collation.
What no op accounts for is Python and framework time (the Trainer loop, hooks, autograd bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (bench/throughput.py: the workload and the msov arm)

FAMILIES = [
    "frozen GEMMs", "LoRA A/B (+dropout, scaling)", "attention kernel (SDPA)", "attention glue (RoPE, reshape)",
    "packed mask / positions", "norms (RMSNorm)", "MLP activation (SiLU, mul)", "residual adds",
    "embedding", "LM head (supervised rows)", "loss + logits slicing", "optimizer (AdamW, zero_grad)",
    "grad clip + other ops", "data collation", "Python / framework (no op)",
]


def module_family(module, name: str) -> str | None:
    """The family of ops run directly inside `module` (None: not a scope of its own)."""
    kind = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "base_layer":
        return "frozen GEMMs"
    if leaf in ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B") or (
            "lora" in type(module).__module__ and kind == "Linear"):
        return "LoRA A/B (+dropout, scaling)"
    if leaf == "lm_head":
        return "LM head (supervised rows)"
    if leaf == "embed_tokens":
        return "embedding"
    if kind.endswith("RMSNorm"):
        return "norms (RMSNorm)"
    if kind.endswith("Attention"):
        return "attention glue (RoPE, reshape)"
    if kind.endswith("MLP"):
        return "MLP activation (SiLU, mul)"
    if kind.endswith("DecoderLayer"):
        return "residual adds"
    if kind.endswith("RotaryEmbedding") or kind.endswith("Model") and not kind.endswith("ForCausalLM"):
        return "packed mask / positions"
    if kind.endswith("ForCausalLM"):
        return "loss + logits slicing"
    if kind == "Linear" and leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        return "frozen GEMMs"  # not LoRA-wrapped (e.g. a narrower target_modules)
    return None


SCOPE = "msov::"
ATTENTION_KERNELS = ("scaled_dot_product", "flash_attention", "efficient_attention", "attention_math", "bmm",
                     "softmax", "baddbmm")


def add_scopes(model) -> None:
    """Forward hooks that open a profiler range named after the module's family around its forward."""
    import torch

    for name, module in model.named_modules():
        family = module_family(module, name)
        if family is None:
            continue
        label = SCOPE + family

        def enter(mod, args, label=label):
            mod._msov_ranges = getattr(mod, "_msov_ranges", []) + [torch.ops.profiler._record_function_enter_new(
                label, None)]

        def leave(mod, args, output):
            torch.ops.profiler._record_function_exit._RecordFunction(mod._msov_ranges.pop())

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def classify(events, ops: dict | None = None) -> dict[str, float]:
    """Self CPU time (µs) per family over the profiled events; per (family, op name) into `ops` when given."""

    def scope_of(event) -> str | None:
        e = event
        while e is not None:
            if e.name.startswith(SCOPE):
                return e.name[len(SCOPE):]
            if e.name.startswith("Optimizer.step") or e.name.startswith("Optimizer.zero_grad"):
                return "optimizer (AdamW, zero_grad)"
            if e.name == "msov.collate":
                return "data collation"
            if e.name == "msov.compute_loss":
                return "loss + logits slicing"
            e = e.cpu_parent
        return None

    def in_backward(event):
        p = event
        while p is not None:
            if p.name.startswith("autograd::engine::evaluate_function:"):
                return p
            p = p.cpu_parent
        return None

    def op_key(name: str) -> str:
        # "aten::_log_softmax" and "LogSoftmaxBackward0" both become "logsoftmax"
        name = name.split("::")[-1].split(": ")[-1]
        name = re.sub(r"Backward\d*$", "", name)
        return name.replace("_", "").lower()

    # Every forward op recording an autograd sequence number; the backward node's own op is preferred (ops that
    # create no node can carry the same number).
    candidates: dict[int, list] = defaultdict(list)
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and in_backward(e) is None:
            candidates[e.sequence_nr].append(e)

    def forward_family(node) -> str | None:
        found = candidates.get(node.sequence_nr, [])
        key = op_key(node.name)
        for e in found:
            if op_key(e.name) == key and scope_of(e) is not None:
                return scope_of(e)
        return next((scope_of(e) for e in found if scope_of(e) is not None), None)

    totals: dict[str, float] = defaultdict(float)
    for e in events:
        own = e.self_cpu_time_total
        if not own:
            continue
        backward = in_backward(e)
        family = scope_of(e)
        if backward is not None:
            family = forward_family(backward) or family
        is_op = e.name.startswith(("aten::", "mkldnn", "onednn")) or "::" in e.name and not e.name.startswith(
            ("msov", "autograd::", "ProfilerStep", "Optimizer.", SCOPE))
        if family == "data collation":
            pass  # the collator is Python; its ops and its own time alike
        elif not is_op:
            family = "Python / framework (no op)"
        elif family == "attention glue (RoPE, reshape)" and any(k in e.name for k in ATTENTION_KERNELS):
            family = "attention kernel (SDPA)"
        family = family or "grad clip + other ops"
        totals[family] += own
        if ops is not None:
            ops[(family, ("bwd " if backward is not None else "") + e.name)] += own
    return totals


def main(argv=None) -> int:
    parser = throughput.add_workload_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.set_defaults(rows=64)
    parser.add_argument("--warmup", type=int, default=2, help="steps before anything is timed")
    parser.add_argument("--steps", type=int, default=4, help="steps timed, then the same number profiled")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled steps here")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--row-attention", action="store_true",
                        help="attention row by row in each packed bin (bench/throughput.py's msov_rowattn arm)")
    parser.add_argument("--top", type=int, default=25, help="also list the N largest ops (0: none)")
    args = parser.parse_args(argv)
    needed = args.warmup + 2 * args.steps
    args.rows = max(args.rows, needed * args.batch_size)

    from mistral_sov.guard.env import enforce_offline_env

    enforce_offline_env()
    warnings.filterwarnings("ignore")
    import datasets
    import torch
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="msov-profile-") as tmp:
        work = Path(tmp)
        stats = throughput.prepare(work, args)
        throughput._threads(args.threads)
        peak = throughput.matmul_peak()
        tokenizer = AutoTokenizer.from_pretrained(work / "model")
        trainer = throughput.build_msov(work, args, datasets.load_from_disk(str(work / "tokens")), tokenizer,
                                        row_attention=args.row_attention)
        trainer.remove_callback(PrinterCallback)
        add_scopes(trainer.model)
        collate, compute_loss = trainer.data_collator, trainer.compute_loss
        window = {"rows": [], "on": False}

        def scoped_collate(features):
            with torch.profiler.record_function("msov.collate"):
                batch = collate(features)
            if window["on"]:
                window["rows"] += [(len(f["input_ids"]), sum(x != -100 for x in f["labels"][1:])) for f in features]
            return batch

        def scoped_loss(*a, **k):
            with torch.profiler.record_function("msov.compute_loss"):
                return compute_loss(*a, **k)

        trainer.data_collator, trainer.compute_loss = scoped_collate, scoped_loss
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        marks: dict[str, float] = {}
        timed = {}

        class Window(TrainerCallback):
            # The next batch is collated before on_step_begin, so the window runs from one step's end to another's:
            # each of its steps includes its own collation.
            def on_step_end(self, a, state, control, **k):
                step = state.global_step
                if step == args.warmup:
                    window["on"], marks["timed"] = True, time.perf_counter()
                elif step == args.warmup + args.steps:
                    timed["seconds"], timed["rows"] = time.perf_counter() - marks["timed"], window["rows"]
                    window["rows"] = []
                    prof.start()
                    marks["profiled"] = time.perf_counter()
                elif step == args.warmup + 2 * args.steps:
                    prof.stop()
                    marks["profiled"] = time.perf_counter() - marks["profiled"]
                    window["on"] = False
                    control.should_training_stop = True

        trainer.add_callback(Window())
        trainer.args.max_steps = needed
        trainer.train()
        config = trainer.model.get_base_model().config
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        events = prof.events()
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
    ops: dict = defaultdict(float)
    totals = classify(events, ops)
    wall_us = marks["profiled"] * 1e6
    totals["Python / framework (no op)"] += max(0.0, wall_us - sum(totals.values()))
    report(args, stats, config, peak, timed, window["rows"], totals, wall_us, trainable)
    if args.top:
        print("\nlargest ops (self time, ms/step; 'bwd' = in the backward pass):")
        for (family, name), us in sorted(ops.items(), key=lambda x: -x[1])[:args.top]:
            print(f"  {us / 1e3 / args.steps:>8.1f}  {name:<48} {family}")
    return 0


def report(args, stats, config, peak, timed, profiled_rows, totals, wall_us, trainable):
    flops = throughput.model_flops(config, trainable, timed["rows"])
    supervised = sum(s for _, s in timed["rows"])
    step_ms = timed["seconds"] / args.steps * 1e3
    print(f"model: hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size}; "
          f"{args.threads} thread(s); matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"rows: median {stats['median_len']:.0f} tokens, batch {args.batch_size}, max_seq_len {args.max_seq_len}")
    print(f"unprofiled: {step_ms:.0f} ms/step, {supervised / timed['seconds']:.0f} supervised tok/s, "
          f"MFU {flops / timed['seconds'] / peak:.1%} ({args.steps} steps after {args.warmup} warm-up)")
    print(f"profiled:   {wall_us / 1e3 / args.steps:.0f} ms/step (profiler overhead included)\n")
    print(f"{'family':<34}{'ms/step':>9}{'share':>8}")
    rows = sorted(((f, totals.get(f, 0.0)) for f in FAMILIES), key=lambda x: -x[1])
    for family, us in rows:
        print(f"{family:<34}{us / 1e3 / args.steps:>9.1f}{us / wall_us:>8.1%}")
    print(f"{'total (wall)':<34}{wall_us / 1e3 / args.steps:>9.1f}{1:>8.0%}")
    if args.json:
        args.json.write_text(json.dumps({"ms_per_step_unprofiled": step_ms, "mfu": flops / timed["seconds"] / peak,
                                         "families_ms_per_step": {f: us / 1e3 / args.steps for f, us in rows}},
                                        indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
