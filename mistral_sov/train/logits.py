"""The logits a loss needs: only at the positions whose next token is supervised (SFT and DPO alike)."""

from __future__ import annotations


def supervised_logits(model, batch: dict):
    """Logits at the positions whose next token is supervised, and those next tokens.

    The LM head and the loss run only where a label is not -100: for chat data most positions are prompt,
    and with a large vocabulary the LM head is a large share of a small model's compute.
    `use_cache=False` is not an optimisation: with a cache, transformers ignores restarting `position_ids`
    and packed rows attend to one another (tests/test_packing.py checks both).
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    keep = targets != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _slices_logits(model):
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    else:
        outputs = model(**inputs, use_cache=False)
        outputs.logits = outputs.logits[keep]
    return outputs, targets[keep]


def _slices_logits(model) -> bool:
    """Every causal LM of transformers 5 takes `logits_to_keep` (a boolean mask included); remote code may not."""
    import inspect

    for wrapper in ("_orig_mod", "module"):  # torch.compile, DDP
        model = getattr(model, wrapper, model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def supervised_token_logps(model, batch: dict, *, chunk: int = 1024):
    """Log-probabilities of the supervised next tokens, the LM head and log-softmax run `chunk` positions at a time.

    Returns (logps [n_supervised], targets [n_supervised], keep [batch, seq]): `-logps.sum()` is the summed
    cross-entropy over `supervised_logits`, to rounding. The model runs through its own forward (DDP's and
    compile's wrappers included); a pre-hook takes the hidden states the head would receive and hands the head an
    empty slice instead. Each chunk's head + log-softmax runs under checkpointing: its [chunk, vocab] logits are
    freed before the next chunk and recomputed in backward, so no [n_supervised, vocab] tensor exists in forward
    or backward. Models whose head is not a plain projection (soft-capped or scaled logits, remote code without
    `logits_to_keep`) and FSDP-sharded heads take the unchunked path.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = targets != -100
    head = _plain_head(model)
    if head is None:
        outputs, kept = supervised_logits(model, batch)
        logps = torch.log_softmax(outputs.logits.float(), dim=-1).gather(-1, kept[:, None]).squeeze(-1)
        return logps, kept, keep
    captured = {}

    def take_hidden(module, args):
        captured["hidden"] = args[0]
        return (args[0][:0],) + tuple(args[1:])  # the head projects nothing inside the model's forward

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    handle = head.register_forward_pre_hook(take_hidden)
    try:
        model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    hidden, kept = captured["hidden"], targets[keep]
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, hidden.shape[0], max(chunk, 1)):
        args = (head, hidden[start:start + chunk], kept[start:start + chunk])
        if recompute:
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logps(*args))
    logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return logps, kept, keep


def _chunk_logps(head, hidden, targets):
    import torch

    logits = head(hidden).float()  # as the unchunked loss: the head in the model's dtype, the softmax in fp32
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _plain_head(model):
    """The output projection when logits are exactly `head(final hidden states)`, else None."""
    if not _slices_logits(model):
        return None
    for wrapper in ("_orig_mod", "module"):  # torch.compile, DDP
        model = getattr(model, wrapper, model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale")):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in head.parameters()):
        # FSDP2 reshards the head after the forward pass and ZeRO-3 partitions it: a chunk recomputed in backward
        # would see a shard, not the weight its forward used (torch.utils.checkpoint refuses the mismatch).
        return None
    return head
