"""Long documents: the LM head and loss in chunks, checkpointed activations offloaded, tiled MLPs, unquantized
parameters in the compute dtype under QLoRA, and `msov plan --max-seq-len-for`."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, small_recipe

SHAPES = REPO / "tests" / "shapes" / "mistral-7b-instruct-v0.3"
QLORA_7B = ["--set", f"model.path={SHAPES}", "--set", "lora.r=32", "--set", "train.batch_size=1"]


def _model(tiny_model, *, lora_head: bool = False, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_sov.model.load import attach_lora
    from mistral_sov.recipe import LoraSection

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"] + (["lm_head"] if lora_head else [])
    model = attach_lora(base, LoraSection(r=8, alpha=16, dropout=0.0, target_modules=targets))
    for name, param in model.named_parameters():  # lora_B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _batch(vocab: int, *, rows: int = 2, length: int = 40):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt
    labels[1, 30:] = -100  # and some padding-like tail
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora_head", [False, True])
def test_chunked_loss_and_gradients_equal_the_unchunked(tiny_model, lora_head):
    import torch
    import torch.nn.functional as F

    from mistral_sov.train.logits import supervised_logits, supervised_token_logps

    model = _model(tiny_model, lora_head=lora_head)
    batch = _batch(model.config.vocab_size)
    outputs, targets = supervised_logits(model, batch)
    reference = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
    (reference / targets.numel()).backward()  # the mean, as a training step divides it
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    logps, kept, keep = supervised_token_logps(model, batch, chunk=7)
    loss = -logps.sum()
    (loss / kept.numel()).backward()
    assert torch.equal(kept, targets) and keep.sum() == kept.numel() == logps.numel()
    assert abs(loss.item() - reference.item()) <= 1e-6 * abs(reference.item())
    got = _grads(model)
    assert got.keys() == expected.keys() and any("lm_head" in n for n in got) == lora_head
    for name, grad in expected.items():  # fp32 rounding only (a single chunk is bit-identical)
        assert (got[name] - grad).abs().max() <= 1e-6, name


def test_no_logits_tensor_over_all_supervised_tokens(tiny_model):
    """Forward and backward (the recompute included), the head never projects more than one chunk, and nothing
    autograd keeps has a vocabulary dimension."""
    import torch

    from mistral_sov.train.logits import supervised_token_logps

    model = _model(tiny_model)
    vocab = model.config.vocab_size
    batch = _batch(vocab, rows=3, length=64)
    head = model.get_base_model().get_output_embeddings()
    rows = []
    head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():  # not the head itself
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, kept, _ = supervised_token_logps(model, batch, chunk=16)
    (-logps.sum()).backward()
    assert kept.numel() > 100 and max(rows) <= 16
    assert sum(r for r in rows if r) == 2 * kept.numel()  # each chunk once in forward, once in its recompute
    assert saved and not [shape for shape in saved if vocab in shape]


def _losses(tiny_model, tmp_path, name, write_recipe, quantization=None, attn=None, **train):
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    data = small_recipe(tiny_model, tmp_path / name, max_steps=4, logging_steps=1, group_by_length=False, **train)
    data["data"]["eval"] = []
    if attn:
        data["model"]["attn_implementation"] = attn
    if quantization:
        data["quantization"] = quantization
    finetune(load_recipe(write_recipe(data, f"{name}.yaml")))
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_offload_and_tiled_mlps_train_the_same(tiny_model, tmp_path, write_recipe):
    """Offloading is a no-op on CPU but runs the reentrant checkpoint path; MLPs tiled in chunks of 32 tokens."""
    plain = _losses(tiny_model, tmp_path, "ckpt", write_recipe, gradient_checkpointing=True)
    offloaded = _losses(tiny_model, tmp_path, "offload", write_recipe, gradient_checkpointing=True,
                        offload_activations=True)
    tiled = _losses(tiny_model, tmp_path, "tiled", write_recipe, gradient_checkpointing=True, mlp_chunk=32)
    assert len(plain) == 4 and plain[-1] < plain[0]
    assert offloaded == plain
    assert tiled == pytest.approx(plain, abs=1e-4)


def test_tiled_mlp_gradients_equal_the_whole_block(tiny_model):
    from mistral_sov.train.trainer import tile_mlps

    model = _model(tiny_model)
    batch = _batch(model.config.vocab_size, rows=2, length=48)
    model(**batch).loss.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    assert tile_mlps(model, 10) == model.config.num_hidden_layers
    model(**batch).loss.backward()
    for name, grad in _grads(model).items():
        assert (grad - expected[name]).abs().max() <= 1e-6, name


def test_qlora_in_compute_dtype_follows_the_fp32_upcast_run(tiny_model, tmp_path, write_recipe):
    import torch

    from mistral_sov.model.load import inspect_model_folder, load_model
    from mistral_sov.recipe import ModelSection, QuantizationSection

    nf4 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    model = load_model(inspect_model_folder(str(tiny_model)), ModelSection(path=str(tiny_model)),
                       quantization=QuantizationSection(**nf4))
    kinds = {p.dtype for p in model.parameters() if type(p).__name__ == "Parameter"}
    assert kinds == {torch.bfloat16}
    held = _losses(tiny_model, tmp_path, "bf16", write_recipe, quantization=nf4)
    upcast = _losses(tiny_model, tmp_path, "fp32", write_recipe, quantization={**nf4, "upcast_unquantized": True})
    assert held[-1] < held[0]
    assert held == pytest.approx(upcast, rel=2e-2)


def _plan(cli, *args):
    result = cli("plan", str(REPO / "recipes" / "mistral-7b-qlora.yaml"), *QLORA_7B, *args, "--json")
    return result, json.loads(result.stdout)


@pytest.mark.parametrize("gib,at_least", [(12, 16384), (24, 32768)])
def test_7b_qlora_long_context_fits_by_plan(cli, gib, at_least):
    result, report = _plan(cli, "--set", "train.offload_activations=true", "--set", f"train.max_seq_len={at_least}",
                           "--gpu-mem", f"{gib}GiB")
    assert result.exit_code == 0, result.stdout
    assert report["verdict"] == "fits"
    result, longest = _plan(cli, "--set", "train.offload_activations=true", "--max-seq-len-for", f"{gib}GiB")
    assert result.exit_code == 0 and longest["longest"]["max_seq_len"] >= at_least


def test_max_seq_len_for_answers_and_names_the_cheapest_change(cli):
    result, report = _plan(cli, "--max-seq-len-for", "12GiB")
    assert result.exit_code == 0
    longest = report["longest"]
    assert report["status"] == "max_seq_len" and longest["budget"] == 12 * 2**30
    assert 4096 <= longest["max_seq_len"] < 16384 and longest["estimated"] <= 12 * 2**30
    assert longest["next"] and longest["next"]["max_seq_len"] > longest["max_seq_len"]
    assert "train.offload_activations=true" in longest["next"]["set"]
    screen = cli("plan", str(REPO / "recipes" / "mistral-7b-qlora.yaml"), *QLORA_7B, "--max-seq-len-for", "12GiB")
    assert screen.exit_code == 0 and "longest sequence" in screen.stdout and "offload" in screen.stdout


def test_packed_rows_get_no_mask_and_everything_else_sdpas_own():
    import torch

    from mistral_sov.data.packing import packed_rows_mask

    assert packed_rows_mask(batch_size=2, q_length=64, kv_length=64) is None  # a training batch: rows by position
    assert packed_rows_mask(batch_size=2, q_length=64, kv_length=64, local_size=128) is None
    padded = torch.ones(2, 64, dtype=torch.bool)
    padded[1, 50:] = False
    for kwargs in ({"attention_mask": padded}, {"local_size": 32}):  # padding; a window shorter than the bin
        mask = packed_rows_mask(batch_size=2, q_length=64, kv_length=64, **kwargs)
        assert mask is not None and tuple(mask.shape[-2:]) == (64, 64)
    assert packed_rows_mask(batch_size=1, q_length=1, kv_length=65, q_offset=64, kv_offset=0,
                            allow_is_causal_skip=False) is not None  # a cached decoding step


def test_rows_attention_from_the_recipe_trains_as_sdpa_and_plans_no_mask(tiny_model, tmp_path, write_recipe, cli):
    """`model.attn_implementation: msov_packed_sdpa` (packed bins of several rows, no mask built) learns what the
    block-diagonal SDPA mask learns; the plan counts no [seq, seq] mask for it."""
    dense = _losses(tiny_model, tmp_path, "dense", write_recipe)
    rows = _losses(tiny_model, tmp_path, "rows", write_recipe, attn="msov_packed_sdpa")
    assert len(dense) == 4 and rows == pytest.approx(dense, rel=1e-5)
    plans = {attn: _plan(cli, "--set", f"model.attn_implementation={attn}")[1] for attn in ("sdpa", "msov_packed_sdpa")}
    assert plans["sdpa"]["memory"]["attention_mask"] > 0 and plans["msov_packed_sdpa"]["memory"]["attention_mask"] == 0
