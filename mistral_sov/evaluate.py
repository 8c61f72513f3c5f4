"""Held-out loss and a quick look at generations."""

from __future__ import annotations

import math


def evaluation_loss(model, dataset, collator, *, batch_size: int = 8) -> dict:
    """Mean cross-entropy over supervised tokens (token-weighted, so batch composition does not change it)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            total += F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            ).item()
            count += int((shift_labels != -100).sum())
    if was_training:
        model.train()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 48,
                   synced_gpus: bool | None = None) -> str:
    """Greedy continuation of a conversation: deterministic, so before/after comparisons mean something.

    `synced_gpus`: under FSDP every rank must run as many forward passes as the longest (each one gathers
    shards from all ranks), even if its own reply ended earlier. None: transformers decides (DeepSpeed ZeRO-3).
    """
    import torch

    from .data import render_prompt

    mistral = getattr(tokenizer, "msov_mistral", None)
    if mistral is not None:  # the tokenizer of record encodes the prompt, as it encoded the training rows
        from .model.mistral_native import encode_prompt

        ids = torch.tensor([encode_prompt(mistral, messages)])
        encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        encoded = tokenizer(render_prompt(messages, tokenizer), return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **{k: v.to(device) for k, v in encoded.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
        )
    if was_training:
        model.train()
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def resolve_target(path: str) -> tuple[str, str | None]:
    """(base model folder, adapter folder or None) for a run folder, an adapter folder or a model folder."""
    import json
    from pathlib import Path

    from .errors import InputError

    target = Path(path)
    if (target / "run.json").is_file() and (target / "adapter").is_dir():
        target = target / "adapter"
    if (target / "adapter_config.json").is_file():
        base = json.loads((target / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError(f"{target}/adapter_config.json: no base_model_name_or_path; cannot find the base model.")
        return base, str(target)
    if (target / "config.json").is_file():
        return str(target), None
    raise InputError(f"'{path}' is not a run folder, an adapter folder or a model folder.",
                     hint="Pass the output.dir of a finished run, its adapter/ folder, or a local model folder.")


def load_for_eval(path: str):
    """(base model, model with the adapter applied or None, tokenizer), all local, for eval and generate."""
    from peft import PeftModel

    from .model.load import inspect_model_folder, load_model, load_tokenizer
    from .recipe import ModelSection

    base_ref, adapter = resolve_target(path)
    folder = inspect_model_folder(base_ref)
    tokenizer = load_tokenizer(folder)
    base = load_model(folder, ModelSection(path=str(folder.path)))
    if adapter is None:
        return base, None, tokenizer
    # A second copy of the base keeps the before/after comparison honest: PEFT wraps the module it is given.
    tuned = PeftModel.from_pretrained(load_model(folder, ModelSection(path=str(folder.path))), adapter)
    return base, tuned, tokenizer
