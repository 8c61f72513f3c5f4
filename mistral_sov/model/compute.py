"""Training compute in model FLOPs: the work a LoRA step cannot avoid, counted from the model's shape.

One count, used by `msov finetune` (the run record's `compute`) and by bench/throughput.py (its MFU):

    FLOPs = 4·N_frozen·T + 6·N_trainable·T + 4·d·V·S + 12·L·d_q·P

The familiar 6·N·T assumes every weight gets a gradient; under LoRA the frozen weights do not. A frozen projection
weight costs 2 FLOPs per token forward and 2 backward (the gradient of its input, which the adapters below it
need), none for a weight gradient: 4. A trainable (LoRA) weight costs those and 2 more for its own gradient: 6.
The LM head (d·V) runs only at supervised positions S, as msov slices the logits there. Causal attention costs
QKᵀ and AV (2 × 2 FLOPs per query-key pair per query dimension forward, twice that backward) over the P
query-key pairs within each row. The embedding lookup costs nothing; norms, activations and the optimizer are
ignored (linear in parameters or tokens, and small). Recomputation under gradient checkpointing is not counted:
these are model FLOPs, not what the hardware executed.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMULA = ("4·N_frozen·T + 6·N_trainable·T + 4·d·V·S + 12·L·d_q·P (model FLOPs of LoRA training: frozen "
           "projection weights forward + input gradient, trainable weights also their weight gradient, the LM head at "
           "the S supervised positions, causal attention over P query-key pairs within rows; T tokens processed on "
           "all ranks, padding included; recomputation not counted)")
FORMULA_WITHOUT_SHAPE = ("4·(N_total − N_trainable)·T + 6·N_trainable·T (model shape unknown: every frozen "
                         "parameter counted at every token, attention not counted; T tokens processed on all ranks)")
# The European Commission's 2025 guidelines for general-purpose AI models: a modifier whose modification uses more
# than a third of the original model's training compute is presumed the provider of a new model.
THRESHOLD = 1 / 3


@dataclass(frozen=True)
class ModelShape:
    """What the count needs from config.json: per-token frozen matmul weights, the LM head, attention width."""

    frozen_matmul: int  # q, k, v, o, gate, up, down weights of every layer (experts: the active ones)
    lm_head: int  # hidden size × vocabulary
    attention_width: int  # layers × query width (heads × head dim)

    @classmethod
    def from_config(cls, config) -> ModelShape | None:
        """From a transformers config or config.json's dict; None when a field the count needs is missing."""
        if hasattr(config, "get_text_config"):  # a multimodal config: the language model trains
            config = config.get_text_config()
        elif isinstance(config, dict) and isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        try:
            d, layers, inter = int(get("hidden_size")), int(get("num_hidden_layers")), int(get("intermediate_size"))
            heads, vocab = int(get("num_attention_heads")), int(get("vocab_size"))
            head_dim = int(get("head_dim", None) or d // heads)
            kv_heads = int(get("num_key_value_heads", None) or heads)
        except (TypeError, ValueError):
            return None
        experts = int(get("num_experts_per_tok", None) or 1)  # a mixture of experts runs k of its MLPs per token
        q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
        body = layers * (d * q_dim * 2 + d * kv_dim * 2 + 3 * d * inter * experts)  # q, o, k, v, gate, up, down
        return cls(frozen_matmul=body, lm_head=d * vocab, attention_width=layers * q_dim)


def training_flops(shape: ModelShape, *, trainable: int, tokens: float, supervised: float,
                   attention_pairs: float) -> float:
    """Model FLOPs of LoRA training over `tokens` tokens, `supervised` of them supervised, with `attention_pairs`
    causal query-key pairs (Σ L·(L+1)/2 over the rows): the module docstring's formula."""
    return (tokens * (4 * shape.frozen_matmul + 6 * trainable) + supervised * 4 * shape.lm_head
            + 12 * shape.attention_width * attention_pairs)


def training_flops_without_shape(*, total: int, trainable: int, tokens: float) -> float:
    """The count when the model's shape is unknown: every frozen parameter at every token, no attention."""
    return tokens * (4 * (total - trainable) + 6 * trainable)


def causal_pairs(length: int) -> int:
    """Query-key pairs causal attention computes within one row of `length` tokens."""
    return length * (length + 1) // 2
