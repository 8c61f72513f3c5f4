#!/usr/bin/env bash
# The 7B max-context measurement for a lent GPU (bench/gpu.sh can call `gpu_long_context` after sourcing this file,
# or run it directly): a random-weight Mistral-7B-shaped model built on the device (no weights to copy), quantized
# nf4 + double quant, unquantized parameters in bf16, LoRA r=32 on all seven projections, gradient checkpointing
# with tiled MLPs and the chunked LM head + loss, paged 8-bit AdamW, batch 1 (one row of two packed documents,
# SDPA). For offload off and on, lengths double from 4k until the step runs out of memory; each prints the peak
# allocated and reserved memory next to `msov plan`'s peak for the same settings. Under 3 minutes on an H200.
#
#   bash bench/gpu_long_context.sh                        # on the GPU machine, from the repository root
#   MSOV_LC_SMOKE=1 bash bench/gpu_long_context.sh        # the same code on a tiny shape, on CPU (a syntax check)
set -euo pipefail

gpu_long_context() {
    local python="${PYTHON:-python}"
    [ -x .venv/bin/python ] && python=.venv/bin/python
    timeout "${MSOV_LC_TIMEOUT:-170}" "$python" - <<'EOF'
import os, time
from pathlib import Path
from mistral_sov.guard.env import enforce_offline_env
enforce_offline_env()
import torch
import bitsandbytes as bnb
from transformers import AutoConfig, AutoModelForCausalLM
from mistral_sov.model.load import _hold_in_compute_dtype, _keep_cpu_4bit_trainable, attach_lora
from mistral_sov.model.memory import _apply, estimate, read_shapes
from mistral_sov.recipe import load_recipe
from mistral_sov.train.logits import supervised_token_logps
from mistral_sov.train.trainer import offloaded_activations, tile_mlps

smoke = os.environ.get("MSOV_LC_SMOKE") == "1"
device = "cpu" if smoke else "cuda"
shapes_dir = Path("tests/shapes/mistral-7b-instruct-v0.3")
overrides = [f"model.path={shapes_dir}", "lora.r=32", "train.batch_size=1", "train.gradient_checkpointing=true"]
recipe = load_recipe(Path("recipes/mistral-7b-qlora.yaml"), overrides)
config = AutoConfig.from_pretrained(shapes_dir)
if smoke:
    config.update({"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 4096})
started = time.monotonic()
torch.manual_seed(0)
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
# nn.Linear -> bnb Linear4bit, quantized on the device, as from_pretrained with BitsAndBytesConfig would load it.
for name, module in list(model.named_modules()):
    for child_name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear and child is not model.get_output_embeddings():
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(device)
            setattr(module, child_name, q)
            del child
model.is_loaded_in_4bit = True
model.config.use_cache = False
_keep_cpu_4bit_trainable(model)
from peft import prepare_model_for_kbit_training
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
_hold_in_compute_dtype(model, torch.bfloat16)
model = attach_lora(model, recipe.lora)
tile_mlps(model, recipe.train.mlp_chunk)
if device == "cuda":
    torch.cuda.empty_cache()
print(f"model built and quantized on {device} in {time.monotonic() - started:.0f} s; LoRA r={recipe.lora.r}", flush=True)
vocab = model.config.vocab_size
optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-5) \
    if device == "cuda" else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
GiB = 2**30
print("| offload | tokens | step s | peak allocated | peak reserved | plan peak | plan total (+ runtime) |", flush=True)
print("|---|---|---|---|---|---|---|", flush=True)
lengths = [512, 1024] if smoke else [4096, 8192, 16384, 24576, 32768, 49152, 65536]
for offload in (False, True):
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": offload})
    if offload:
        model.base_model.model.enable_input_require_grads()
    planned_recipe = _apply(recipe, [f"train.offload_activations={str(offload).lower()}"])
    shapes = read_shapes(planned_recipe)
    model.train()
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(3, vocab, (1, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 16] = -100
        positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)])[None]
        batch = {k: v.to(device) for k, v in
                 {"input_ids": ids, "labels": labels, "position_ids": positions}.items()}
        plan = estimate(shapes, _apply(planned_recipe, [f"train.max_seq_len={length}"]))
        if device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        try:
            with offloaded_activations(offload):
                logps, kept, _ = supervised_token_logps(model, batch, chunk=recipe.train.loss_chunk)
            loss = -logps.sum() / kept.numel()
            loss.backward()
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(f"| {'on' if offload else 'off'} | {length:,} | out of memory | | | "
                  f"{plan['peak'] / GiB:.2f} GiB | {plan['with_runtime'] / GiB:.2f} GiB |", flush=True)
            del batch
            torch.cuda.empty_cache()
            break
        seconds = time.monotonic() - t0
        alloc = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else float("nan")
        reserved = torch.cuda.max_memory_reserved() / GiB if device == "cuda" else float("nan")
        print(f"| {'on' if offload else 'off'} | {length:,} | {seconds:.1f} | {alloc:.2f} GiB | {reserved:.2f} GiB | "
              f"{plan['peak'] / GiB:.2f} GiB | {plan['with_runtime'] / GiB:.2f} GiB |", flush=True)
        del loss, logps, batch
        if device == "cuda":
            torch.cuda.empty_cache()
print(f"total {time.monotonic() - started:.0f} s", flush=True)
EOF
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    gpu_long_context
fi
