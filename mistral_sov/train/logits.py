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
