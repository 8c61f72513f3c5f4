"""`msov plan`: will this recipe fit this GPU? An estimate from config.json alone, on the meta device.

Nothing is allocated and no weights are read: the model is built on the meta device from the local config.json,
LoRA is attached there (PEFT counts the trainable parameters exactly), and memory is summed from shapes:

  weights      bitsandbytes quantizes `nn.Linear` layers (not the output head, not fused MoE expert tensors);
               every other parameter of a quantized model is upcast to fp32 by prepare_model_for_kbit_training.
  LoRA         adapters, their gradients and the optimizer's states, all fp32 (PEFT upcasts adapters).
  activations  what autograd keeps per token and layer (see `_layer_bytes_per_token`), all layers without
               gradient checkpointing, one layer plus every layer's input with it; plus the loss over the vocab.

The figure is the peak of tensors allocated during a training step at batch_size x max_seq_len tokens (rows
padded or packed to the full length: the worst case). The verdict adds the CUDA context and allocator slack.
Checked on CPU against the peak RSS of real training steps (0.2M-131M parameters; LoRA fp32/bf16, nf4, 8-bit,
with and without checkpointing and dropout): the peak estimate was within -8 % and +13 % of the measured peak.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFolderError
from ..recipe import Recipe
from ..sizes import parse_size

GiB = 1024**3
# CUDA context, cuBLAS workspaces and the caching allocator's fragmentation of the step's short-lived tensors:
# memory nvidia-smi shows in use that torch.cuda.max_memory_allocated does not (typically 0.5-1 GiB and 5-15 %).
RUNTIME_FIXED = 1 * GiB
RUNTIME_SLACK = 0.10
# bitsandbytes block sizes: one absmax per 64 weights; double quant stores those as uint8 plus one fp32 per 256.
_BYTES_4BIT = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer state bytes per trainable parameter: AdamW keeps two fp32 moments, the 8-bit variant two uint8 ones.
_OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_8bit": 2, "sgd": 0}
# Which input tensor a LoRA-wrapped projection reads; projections reading the same tensor share one saved copy.
_INPUT_GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": None,
                 "gate_proj": "mlp", "up_proj": "mlp", "w1": "mlp", "w3": "mlp", "down_proj": "down", "w2": "down"}


@dataclass
class Shapes:
    """What the estimate needs from the architecture, read once from the meta-device model."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int
    experts: int
    experts_per_token: int
    total: int  # every parameter
    quantizable: int  # weights of the nn.Linear layers bitsandbytes would quantize
    quantizable_rows: int  # their output rows (8-bit keeps one fp32 scale per row)
    largest_linear: int  # biggest single weight matrix (dequantized/recomputed transiently)
    trainable: int
    lora_inputs: dict  # per layer: input group -> features per token LoRA layers save (one copy per group)
    lora_features: float  # per layer: sum of the LoRA-wrapped projections' input features
    lora_ranks: float  # per layer: sum of their ranks


def read_shapes(recipe: Recipe) -> Shapes:
    """Build the model on the meta device from its config.json and attach the recipe's LoRA there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..guard.local import require_local_model
    from .load import attach_lora, read_config

    folder = require_local_model(recipe.model.path)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: no config.json; the plan reads the model's shapes from it.")
    read_config(folder / "config.json")
    remote = recipe.model.trust_remote_code
    # Everything, LoRA's new layers included, is built on the meta device: shapes only, so a config with absurd
    # sizes costs nothing (tests/test_bad_inputs.py runs this under a 4 GiB address-space limit).
    with torch.device("meta"):
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=remote)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelFolderError(f"{folder / 'config.json'}: transformers cannot build the model from it: "
                                   f"{type(exc).__name__}: {exc}") from None
        quantizable = _quantizable_linears(model)
        total = sum(p.numel() for p in model.parameters())
        peft_model = attach_lora(model, recipe.lora)  # wraps `model` in place, so count totals first
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
    per_token = getattr(text, "num_experts_per_tok", None) or 1
    intermediate = getattr(text, "moe_intermediate_size", None) if experts > 1 else None
    inputs, features, ranks = _lora_layout(peft_model, text.num_hidden_layers)
    return Shapes(
        architecture=",".join(config.architectures or [config.model_type]),
        layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=intermediate or text.intermediate_size, vocab=text.vocab_size,
        experts=experts, experts_per_token=per_token if experts > 1 else 1, total=total,
        quantizable=sum(m.weight.numel() for m in quantizable),
        quantizable_rows=sum(m.out_features for m in quantizable),
        largest_linear=max([m.weight.numel() for m in quantizable] or [0]),
        trainable=trainable, lora_inputs=inputs, lora_features=features, lora_ranks=ranks,
    )


def _quantizable_linears(model) -> list:
    """The layers transformers hands to bitsandbytes: plain nn.Linear, minus the output head and tied weights."""
    from torch import nn

    try:  # transformers' own rule, so the estimate follows the library version that will load the model
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    except ImportError:
        skip = [name for name, m in model.named_modules() if m is model.get_output_embeddings()]

        def should_convert_module(name, patterns):
            return not any(name == p or name.startswith(p + ".") for p in patterns)

    return [m for name, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(name, skip)]


def _lora_layout(peft_model, layers: int) -> tuple[dict, float, float]:
    """Per layer: input features LoRA keeps for backward (one copy per shared input), dropout copies, ranks."""
    from peft.tuners.lora import LoraLayer

    inputs: dict[str, int] = {}
    features = ranks = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.r:
            continue
        in_features = getattr(module, "in_features", None) or 0
        features += in_features
        ranks += next(iter(module.r.values()))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _INPUT_GROUPS and _INPUT_GROUPS[leaf] is None:
            continue  # o_proj's input is SDPA's output, which attention keeps anyway
        key = _INPUT_GROUPS.get(leaf) or re.sub(r"\.\d+\.", ".N.", name)  # unknown names: one group each
        inputs[key] = max(inputs.get(key, 0), in_features)
    per_layer = max(layers, 1)
    return inputs, features / per_layer, ranks / per_layer


def estimate(shapes: Shapes, recipe: Recipe) -> dict:
    """Bytes of each part of a training step's peak, for the recipe as it stands."""
    q, train, lora = recipe.quantization, recipe.train, recipe.lora
    others = shapes.total - shapes.quantizable
    if q is None:
        weight_bytes = shapes.total * _DTYPE_BYTES[recipe.model.dtype]
    else:
        per_weight = _BYTES_4BIT[q.double_quant] if q.bits == 4 else 1.0
        quantized = shapes.quantizable * per_weight + (4 * shapes.quantizable_rows if q.bits == 8 else 0)
        # prepare_model_for_kbit_training casts every fp16/bf16 parameter left unquantized to fp32.
        weight_bytes = quantized + others * 4
    trainable = shapes.trainable
    optimizer = _OPTIMIZER_BYTES.get(train.optimizer)
    if optimizer is None:  # adafactor: factored second moment, about one fp32 per row and column of each matrix
        optimizer = 4 / max(lora.r, 1)
    act = _activation_bytes(shapes, recipe)
    parts = {
        "weights": int(weight_bytes),
        "lora": 4 * trainable,
        "gradients": 4 * trainable,
        "optimizer": int(optimizer * trainable),
        "activations": act["with"] if train.gradient_checkpointing else act["without"],
        "logits": act["logits"],
        "workspace": act["workspace"],
    }
    peak = sum(parts.values())
    dynamic = peak - parts["weights"]  # weights are few large blocks; fragmentation comes from the step's churn
    return {"parts": parts, "peak": peak, "activations_with_checkpointing": act["with"],
            "activations_without_checkpointing": act["without"],
            "with_runtime": int(peak + dynamic * RUNTIME_SLACK + RUNTIME_FIXED)}


def _act_bytes(recipe: Recipe) -> int:
    """Bytes per element of the residual stream autograd keeps.

    A quantized model's stream is fp32: prepare_model_for_kbit_training upcasts the embeddings. Autocast
    (train.dtype bf16/fp16) does not halve it: it keeps the half-precision casts next to the fp32 tensors
    (measured with saved_tensors_hooks: within 4 % of fp32)."""
    if recipe.quantization is not None:
        return 4
    return _DTYPE_BYTES[recipe.model.dtype]


def _layer_bytes_per_token(shapes: Shapes, recipe: Recipe) -> float:
    """What one decoder layer keeps for backward, per token (Llama/Mistral block: RMSNorm, GQA attention, SwiGLU).

    Counted with torch.autograd.graph.saved_tensors_hooks on Mistral blocks in fp32 and bf16, with and without
    dropout and with different target modules; this formula matched each to within 0.1 %.
    """
    a, h, i, seq = _act_bytes(recipe), shapes.hidden, shapes.intermediate, recipe.train.max_seq_len
    k = shapes.experts_per_token
    norms = 2 * 4 * h  # each RMSNorm keeps its input in fp32
    attention = a * (2 * h + 2 * shapes.kv_dim) + 4 * shapes.heads  # SDPA: q, k, v, output; logsumexp
    if recipe.model.attn_implementation == "eager":
        attention += shapes.heads * seq * (4 + a)  # eager attention keeps the probabilities (fp32 softmax + cast)
    mlp = a * 3 * i * k  # SwiGLU: gate output, its SiLU, up output (per routed expert for MoE)
    if k > 1:
        mlp += a * h * k + 4 * shapes.experts  # tokens gathered per expert, router logits
    # LoRA adapters are fp32 (PEFT upcasts them). On an fp32 stream the projections sharing an input share one
    # saved copy (o_proj reads SDPA's output, already kept); on a half-precision stream each LoRA layer keeps its
    # own fp32 cast of its input. Dropout adds, per LoRA layer, its fp32 output and its mask.
    shared = 4 * sum(shapes.lora_inputs.values())
    per_layer_copies = 4 * shapes.lora_features
    if recipe.lora.dropout > 0:
        lora = shared + 5 * shapes.lora_features
    else:
        lora = shared if a == 4 else per_layer_copies
    lora_mid = 4 * shapes.lora_ranks  # lora_A outputs
    return norms + attention + mlp + lora + lora_mid


def _activation_bytes(shapes: Shapes, recipe: Recipe) -> dict:
    tokens = recipe.train.batch_size * recipe.train.max_seq_len
    a = _act_bytes(recipe)
    layer = _layer_bytes_per_token(shapes, recipe) * tokens
    without = shapes.layers * layer + a * shapes.hidden * tokens
    # Checkpointing keeps each layer's input and recomputes one layer at a time during backward.
    with_ckpt = shapes.layers * a * shapes.hidden * tokens + layer
    # The loss over the vocabulary peaks as backward starts: the fp32 log-softmax kept for backward and two fp32
    # gradients (the Trainer has dropped the logits themselves by then). Measured: 12.0-12.3 bytes per logit.
    logits = 12 * shapes.vocab * tokens
    # A layer's backward holds gradients of its largest activations; quantized weights are dequantized per matmul.
    workspace = 2 * a * (shapes.hidden + shapes.intermediate * shapes.experts_per_token) * tokens
    if recipe.quantization is not None or recipe.lora.use_dora:
        workspace += 2 * shapes.largest_linear * _DTYPE_BYTES[_compute_dtype(recipe)]
    return {"with": int(with_ckpt), "without": int(without), "logits": int(logits), "workspace": int(workspace)}


def _compute_dtype(recipe: Recipe) -> str:
    return recipe.quantization.compute_dtype if recipe.quantization else recipe.model.dtype


def _candidates(recipe: Recipe) -> list[tuple[str, str, list[str]]]:
    """(family, why, settings) in order of cost: same maths first (only slower), then numerics, then data."""
    t, q, out = recipe.train, recipe.quantization, []
    if not t.gradient_checkpointing:
        out.append(("ckpt", "turn on gradient checkpointing (about 30% slower, same result)",
                    ["train.gradient_checkpointing=true"]))
    for batch in sorted((d for d in range(1, t.batch_size) if t.batch_size % d == 0), reverse=True):
        accum = t.grad_accum * t.batch_size // batch
        out.append(("batch", f"split each step into micro-batches of {batch} (batch_size {batch}, grad_accum "
                    f"{accum}: same effective batch)", [f"train.batch_size={batch}", f"train.grad_accum={accum}"]))
    if t.optimizer in ("adamw_torch", "adamw_torch_fused"):
        out.append(("optim", "use the 8-bit paged AdamW optimizer (needs CUDA)", ["train.optimizer=paged_adamw_8bit"]))
    if q is None:
        out.append(("quant", "load the base model 8-bit (QLoRA, bitsandbytes)", ["quantization.bits=8"]))
    if q is None or q.bits == 8 or not q.double_quant:
        out.append(("quant", "load the base model 4-bit nf4 with double quant (QLoRA, bitsandbytes)",
                    ["quantization.bits=4", "quantization.quant_type=nf4", "quantization.double_quant=true"]))
    seq = t.max_seq_len
    while seq > 256:
        seq //= 2
        out.append(("seq", f"shorten train.max_seq_len to {seq} (longer rows are truncated or dropped)",
                    [f"train.max_seq_len={seq}"]))
    return out


def _apply(recipe: Recipe, settings: list[str]) -> Recipe:
    import yaml

    data = recipe.model_dump(mode="json")
    for item in settings:
        key, _, value = item.partition("=")
        section, field = key.split(".")
        data[section] = {**(data.get(section) or {}), field: yaml.safe_load(value)}
    return Recipe.model_validate(data)


def cheapest_fix(shapes: Shapes, recipe: Recipe, budget: int) -> dict | None:
    """The first single change that fits; else changes combined in the same order until it fits; else None."""
    options = _candidates(recipe)
    for _, why, settings in options:
        total = estimate(shapes, _apply(recipe, settings))["with_runtime"]
        if total <= budget:
            return {"change": why, "set": settings, "estimated": total}
    chosen: dict[str, tuple[str, list[str]]] = {}  # a later option of the same family replaces the earlier one
    for family, why, settings in options:
        chosen[family] = (why, settings)
        combined = [s for _, group in chosen.values() for s in group]
        total = estimate(shapes, _apply(recipe, combined))["with_runtime"]
        if total <= budget:
            return {"change": "; ".join(w for w, _ in chosen.values()), "set": combined, "estimated": total}
    return None


def default_budget() -> tuple[int, str]:
    """The memory a run here would have: the first CUDA device's, else this machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"cuda:0 ({props.name})"
    try:
        import psutil  # a dependency of accelerate

        available = psutil.virtual_memory().available
    except ImportError:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(available), "CPU (available RAM; no CUDA device here)"


def plan_recipe(recipe: Recipe, *, gpu_mem: str | int | None = None) -> dict:
    """The whole plan as plain data: parameters, memory by part, the verdict and the cheapest fix."""
    from ..guard.env import enforce_offline_env

    enforce_offline_env()
    shapes = read_shapes(recipe)
    budget, source = (parse_size(gpu_mem, option="--gpu-mem", unit_required=True), "--gpu-mem") \
        if gpu_mem is not None else default_budget()
    est = estimate(shapes, recipe)
    fits = est["with_runtime"] <= budget
    q = recipe.quantization
    return {
        "status": "plan",
        "model": {"path": str(Path(recipe.model.path)), "architecture": shapes.architecture,
                  "layers": shapes.layers, "hidden": shapes.hidden, "vocab": shapes.vocab,
                  "experts": shapes.experts, "experts_per_token": shapes.experts_per_token},
        "parameters": {"total": shapes.total, "trainable": shapes.trainable,
                       "quantized": shapes.quantizable if q else 0,
                       "not_quantized": shapes.total - shapes.quantizable if q else shapes.total},
        "settings": {"quantization": _quant_label(recipe), "batch_size": recipe.train.batch_size,
                     "max_seq_len": recipe.train.max_seq_len,
                     "tokens_per_step": recipe.train.batch_size * recipe.train.max_seq_len,
                     "gradient_checkpointing": recipe.train.gradient_checkpointing,
                     "optimizer": recipe.train.optimizer, "train_dtype": recipe.train.dtype},
        "memory": {**est["parts"], "activations_with_checkpointing": est["activations_with_checkpointing"],
                   "activations_without_checkpointing": est["activations_without_checkpointing"],
                   "peak": est["peak"], "runtime_overhead": est["with_runtime"] - est["peak"],
                   "total": est["with_runtime"]},
        "budget": {"bytes": budget, "source": source},
        "verdict": "fits" if fits else "does not fit",
        "headroom": budget - est["with_runtime"],
        "suggestion": None if fits else cheapest_fix(shapes, recipe, budget),
    }


def _quant_label(recipe: Recipe) -> str:
    q = recipe.quantization
    if q is None:
        return f"none ({recipe.model.dtype})"
    if q.bits == 8:
        return f"8-bit (LLM.int8), compute {q.compute_dtype}"
    return f"4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
