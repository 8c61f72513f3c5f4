"""`msov plan`: will this recipe fit this GPU? An estimate from config.json alone, on the meta device.

Nothing is allocated and no weights are read: the model is built on the meta device from the local config.json,
LoRA is attached there (PEFT counts the trainable parameters exactly), and memory is summed from shapes:

  weights      bitsandbytes quantizes `nn.Linear` layers (not the output head, not fused MoE expert tensors);
               every other parameter of a quantized model is held in the compute dtype (in fp32 with
               quantization.upcast_unquantized, as prepare_model_for_kbit_training leaves them).
  LoRA         adapters, their gradients and the optimizer's states, all fp32 (PEFT upcasts adapters).
  activations  what autograd keeps per token and layer (see `_layer_bytes_per_token`), all layers without
               gradient checkpointing; with it, every layer's input (in host memory with
               train.offload_activations) plus one layer's recompute, its dense MLP in train.mlp_chunk tokens.
  logits       the LM head and loss for train.loss_chunk supervised positions at a time.
  mask         the dense block-diagonal mask SDPA and eager attention get for packed rows (flash attention
               takes the rows flattened, msov_packed_sdpa runs SDPA row by row: neither needs one).

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
    lora_mlp_features: float = 0  # per layer: the part of lora_features read by MLP projections
    lora_mlp_inputs: int = 0  # per layer: the part of lora_inputs' features read by MLP projections
    tiled_mlp: bool = False  # the dense MLP blocks train/trainer.py:tile_mlps runs in chunks


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
    inputs, features, ranks, mlp_features = _lora_layout(peft_model, text.num_hidden_layers)
    mlps = [m for m in peft_model.modules() if type(m).__name__.endswith("MLP") and hasattr(m, "gate_proj")]
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
        lora_mlp_features=mlp_features, lora_mlp_inputs=sum(v for k, v in inputs.items() if k in ("mlp", "down")),
        tiled_mlp=experts == 1 and len(mlps) == text.num_hidden_layers,
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


def _lora_layout(peft_model, layers: int) -> tuple[dict, float, float, float]:
    """Per layer: input features LoRA keeps for backward (one copy per shared input), dropout copies, ranks, and
    the input features of the MLP's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    inputs: dict[str, int] = {}
    features = ranks = mlp = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not module.r:
            continue
        in_features = getattr(module, "in_features", None) or 0
        features += in_features
        ranks += next(iter(module.r.values()))
        leaf = name.rsplit(".", 1)[-1]
        mlp += in_features if _INPUT_GROUPS.get(leaf) in ("mlp", "down") else 0
        if leaf in _INPUT_GROUPS and _INPUT_GROUPS[leaf] is None:
            continue  # o_proj's input is SDPA's output, which attention keeps anyway
        key = _INPUT_GROUPS.get(leaf) or re.sub(r"\.\d+\.", ".N.", name)  # unknown names: one group each
        inputs[key] = max(inputs.get(key, 0), in_features)
    per_layer = max(layers, 1)
    return inputs, features / per_layer, ranks / per_layer, mlp / per_layer


def estimate(shapes: Shapes, recipe: Recipe) -> dict:
    """Bytes of each part of a training step's peak, for the recipe as it stands."""
    q, train, lora = recipe.quantization, recipe.train, recipe.lora
    others = shapes.total - shapes.quantizable
    if q is None:
        weight_bytes = shapes.total * _DTYPE_BYTES[recipe.model.dtype]
    else:
        per_weight = _BYTES_4BIT[q.double_quant] if q.bits == 4 else 1.0
        quantized = shapes.quantizable * per_weight + (4 * shapes.quantizable_rows if q.bits == 8 else 0)
        # prepare_model_for_kbit_training casts every parameter left unquantized to fp32; msov casts them back to
        # the compute dtype unless the recipe asks to keep them upcast (model/load.py:_hold_in_compute_dtype).
        weight_bytes = quantized + others * (4 if q.upcast_unquantized else _DTYPE_BYTES[q.compute_dtype])
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
        # The loss's chunk peaks before any layer's backward starts and is freed by then: only what it needs beyond
        # the layer phase (a layer's recompute and backward workspace) adds to the peak.
        "logits": act["loss_hidden"] + max(0, act["logits"] - act["workspace"]
                                           - (act["recompute"] if train.gradient_checkpointing else 0)),
        "attention_mask": act["mask"],
        "workspace": act["workspace"],
    }
    peak = sum(parts.values())
    dynamic = peak - parts["weights"]  # weights are few large blocks; fragmentation comes from the step's churn
    return {"parts": parts, "peak": peak, "activations_with_checkpointing": act["with"],
            "activations_without_checkpointing": act["without"],
            "offloaded": act["offloaded"] if train.gradient_checkpointing else 0,
            "with_runtime": int(peak + dynamic * RUNTIME_SLACK + RUNTIME_FIXED)}


def _act_bytes(recipe: Recipe) -> int:
    """Bytes per element of the residual stream autograd keeps.

    A quantized model's stream has the dtype of its embeddings: the compute dtype, or fp32 when they are upcast.
    Autocast (train.dtype bf16/fp16) does not halve an fp32 stream: it keeps the half-precision casts next to the
    fp32 tensors (measured with saved_tensors_hooks: within 4 % of fp32)."""
    q = recipe.quantization
    if q is not None:
        return 4 if q.upcast_unquantized else _DTYPE_BYTES[q.compute_dtype]
    return _DTYPE_BYTES[recipe.model.dtype]


def _layer_bytes_per_token(shapes: Shapes, recipe: Recipe) -> float:
    whole, mlp = _layer_parts_per_token(shapes, recipe)
    return whole + mlp


def _layer_parts_per_token(shapes: Shapes, recipe: Recipe) -> tuple[float, float]:
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
    # The MLP's own share (what tiling bounds): its activations and its LoRA layers' inputs, dropout and middles.
    mlp_features = shapes.lora_mlp_features
    if recipe.lora.dropout > 0:
        mlp_lora = 4 * shapes.lora_mlp_inputs + 5 * mlp_features
    else:
        mlp_lora = 4 * shapes.lora_mlp_inputs if a == 4 else 4 * mlp_features
    share = mlp_features / shapes.lora_features if shapes.lora_features else 0
    mlp_part = mlp + mlp_lora + lora_mid * share
    return norms + attention + lora + lora_mid - mlp_lora - lora_mid * share, mlp_part


def _activation_bytes(shapes: Shapes, recipe: Recipe) -> dict:
    train = recipe.train
    tokens = train.batch_size * train.max_seq_len
    a = _act_bytes(recipe)
    whole, mlp = _layer_parts_per_token(shapes, recipe)
    without = shapes.layers * (whole + mlp) * tokens + a * shapes.hidden * tokens
    # Checkpointing keeps each layer's input and recomputes one layer at a time during backward; train/trainer.py
    # recomputes a dense MLP `mlp_chunk` tokens at a time (its input kept whole), the rest of the layer at once.
    mlp_tokens = min(tokens, train.mlp_chunk) if shapes.tiled_mlp else tokens
    recompute = whole * tokens + mlp * mlp_tokens + (a * shapes.hidden * tokens if mlp_tokens < tokens else 0)
    inputs = shapes.layers * a * shapes.hidden * tokens
    # Offloaded, the layer inputs wait in host memory; on the device only the one being copied back and the one
    # the forward pass is writing out.
    on_device = min(inputs, 2 * a * shapes.hidden * tokens) if train.offload_activations else inputs
    with_ckpt = on_device + recompute
    # The loss over the vocabulary, one chunk of supervised positions at a time (train/logits.py), peaks in the
    # chunk's backward: 12 bytes per logit in fp32 (the recomputed log-softmax, its gradient, the logits'
    # gradient), 2 more with a half-precision head (its output and gradient in that dtype besides the fp32 ones).
    logits = (12 + 2 * (a < 4)) * shapes.vocab * min(tokens, train.loss_chunk)
    loss_hidden = 2 * a * shapes.hidden * tokens  # the final hidden states at supervised positions, and their grad
    # A layer's backward holds gradients of its largest activations; quantized weights are dequantized per matmul.
    workspace = 2 * a * (shapes.hidden * tokens + shapes.intermediate * shapes.experts_per_token * mlp_tokens)
    if recipe.quantization is not None or recipe.lora.use_dora:
        workspace += 2 * shapes.largest_linear * _DTYPE_BYTES[_compute_dtype(recipe)]
    # SDPA and eager attention get a boolean [seq, seq] mask per row (block-diagonal for packed rows, causal for
    # padded ones), kept for the recompute, and SDPA's additive copy of it in the compute dtype while a layer's
    # attention runs. Flash attention takes packed rows flattened (cu_seqlens) and msov_packed_sdpa runs SDPA row
    # by row: neither needs one.
    mask = 0
    if _builds_mask(recipe):
        mask = train.batch_size * train.max_seq_len ** 2 * (1 + _DTYPE_BYTES[_compute_dtype(recipe)])
    return {"with": int(with_ckpt), "without": int(without), "logits": int(logits), "workspace": int(workspace),
            "loss_hidden": int(loss_hidden), "recompute": int(recompute),
            "mask": int(mask), "offloaded": int(inputs - on_device)}


def _builds_mask(recipe: Recipe) -> bool:
    attn = recipe.model.attn_implementation or ""
    return not (attn.startswith("flash") or attn == "msov_packed_sdpa")


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
    if not t.offload_activations:
        out.append(("offload", "offload checkpointed activations to CPU memory (same result; needs "
                    "checkpointing and host RAM for every layer's input)",
                    ["train.gradient_checkpointing=true", "train.offload_activations=true"]))
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
        combined = list(dict.fromkeys(s for _, group in chosen.values() for s in group))
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
        "settings": _settings(recipe),
        "memory": {**est["parts"], "activations_with_checkpointing": est["activations_with_checkpointing"],
                   "activations_without_checkpointing": est["activations_without_checkpointing"],
                   "offloaded_to_host": est["offloaded"],
                   "peak": est["peak"], "runtime_overhead": est["with_runtime"] - est["peak"],
                   "total": est["with_runtime"]},
        "budget": {"bytes": budget, "source": source},
        "verdict": "fits" if fits else "does not fit",
        "headroom": budget - est["with_runtime"],
        "suggestion": None if fits else cheapest_fix(shapes, recipe, budget),
    }


SEQ_STEP = 256  # --max-seq-len-for answers in multiples of this


def longest_sequence(shapes: Shapes, recipe: Recipe, budget: int) -> tuple[int, int]:
    """(the longest train.max_seq_len, a multiple of SEQ_STEP, whose step fits `budget`; its estimate), (0, 0)
    when not even SEQ_STEP tokens fit. The estimate grows with the length, so doubling then bisecting finds it."""

    def total(length: int) -> int:
        return estimate(shapes, _apply(recipe, [f"train.max_seq_len={length}"]))["with_runtime"]

    if total(SEQ_STEP) > budget:
        return 0, 0
    low, high = 1, 2  # in steps: low fits, high is not known to
    while total(high * SEQ_STEP) <= budget and high < 2**16:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if total(middle * SEQ_STEP) <= budget else (low, middle)
    return low * SEQ_STEP, total(low * SEQ_STEP)


def _longer_options(recipe: Recipe) -> list[tuple[str, list[str]]]:
    """Changes that buy a longer sequence, cheapest first: same maths (only slower), then a smaller adapter."""
    t, lora, out = recipe.train, recipe.lora, []
    if not t.gradient_checkpointing:
        out.append(("turn on gradient checkpointing (about 30% slower, same result)",
                    ["train.gradient_checkpointing=true"]))
    if not t.offload_activations:
        out.append(("offload checkpointed activations to CPU memory (same result, transfers overlapped on CUDA)",
                    ["train.gradient_checkpointing=true", "train.offload_activations=true"]))
    if _builds_mask(recipe):
        out.append(("attention row by row in packed bins, no [seq, seq] mask (same result, no extra package)",
                    ["model.attn_implementation=msov_packed_sdpa"]))
    if t.batch_size > 1:
        out.append((f"batch_size 1, grad_accum {t.grad_accum * t.batch_size} (same effective batch)",
                    ["train.batch_size=1", f"train.grad_accum={t.grad_accum * t.batch_size}"]))
    if lora.dropout > 0:
        out.append(("LoRA without dropout (no dropped copy of each adapted layer's input)", ["lora.dropout=0"]))
    if lora.r > 8:
        out.append((f"a smaller adapter: lora.r {lora.r // 2}", [f"lora.r={lora.r // 2}"]))
    return out


def plan_max_seq_len(recipe: Recipe, *, gpu_mem: str | int) -> dict:
    """`msov plan --max-seq-len-for`: the longest sequence this recipe trains in `gpu_mem`, and what each of the
    changes in `_longer_options` would make it (the first that helps is the cheapest)."""
    from ..guard.env import enforce_offline_env

    enforce_offline_env()
    budget = parse_size(gpu_mem, option="--max-seq-len-for", unit_required=True)
    shapes = read_shapes(recipe)
    length, total = longest_sequence(shapes, recipe, budget)
    options = []
    for why, settings in _longer_options(recipe):
        changed = _apply(recipe, settings)
        changed_shapes = read_shapes(changed) if any(s.startswith("lora.") for s in settings) else shapes
        longer, estimated = longest_sequence(changed_shapes, changed, budget)
        options.append({"change": why, "set": settings, "max_seq_len": longer, "estimated": estimated})
    better = [o for o in options if o["max_seq_len"] > length]
    at = _apply(recipe, [f"train.max_seq_len={length or SEQ_STEP}"])
    return {
        "status": "max_seq_len",
        "model": {"path": str(Path(recipe.model.path)), "architecture": shapes.architecture,
                  "layers": shapes.layers, "hidden": shapes.hidden, "vocab": shapes.vocab},
        "settings": _settings(recipe),
        "longest": {"budget": budget, "max_seq_len": length, "estimated": total,
                    "recipe_max_seq_len": recipe.train.max_seq_len,
                    "recipe_fits": length >= recipe.train.max_seq_len,
                    "memory": estimate(shapes, at)["parts"] if length else None,
                    "next": better[0] if better else None, "options": options},
    }


def _settings(recipe: Recipe) -> dict:
    t = recipe.train
    return {"quantization": _quant_label(recipe), "batch_size": t.batch_size, "max_seq_len": t.max_seq_len,
            "tokens_per_step": t.batch_size * t.max_seq_len, "gradient_checkpointing": t.gradient_checkpointing,
            "offload_activations": t.offload_activations, "loss_chunk": t.loss_chunk, "mlp_chunk": t.mlp_chunk,
            "attn_implementation": recipe.model.attn_implementation, "lora_r": recipe.lora.r,
            "optimizer": t.optimizer, "train_dtype": t.dtype}


def _quant_label(recipe: Recipe) -> str:
    q = recipe.quantization
    if q is None:
        return f"none ({recipe.model.dtype})"
    rest = "fp32" if q.upcast_unquantized else q.compute_dtype
    if q.bits == 8:
        return f"8-bit (LLM.int8), compute {q.compute_dtype}, unquantized parameters {rest}"
    return (f"4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}, "
            f"unquantized parameters {rest}")
