"""Packing: rows share a sequence but never each other's attention or labels, and training means the same thing."""

import json

import pytest
from conftest import SAMPLES, small_recipe

from mistral_sov.data.packing import PackingCollator, pack_rows
from mistral_sov.data.tokens import IGNORE

CAPACITY = 256  # two or three sample rows (57-157 tokens): the batches below need several bins and some padding


def packed_layout(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """The row order `PackingCollator` lays a batch out in (bins of row indices)."""
    return pack_rows(lengths, max_seq_len)


@pytest.fixture(scope="module")
def rows(tiny_model):
    """Eight tokenised helpdesk conversations, of unequal lengths."""
    from mistral_sov.data import load_data_file, tokenize_records
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer

    tokenizer = load_tokenizer(inspect_model_folder(str(tiny_model)))
    records = load_data_file(SAMPLES / "helpdesk_chat.jsonl", "chat").records[:8]
    dataset = tokenize_records(records, tokenizer, max_seq_len=CAPACITY).dataset
    return [dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id


def load(tiny_model, attn="sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    # The library default, and what a model loaded by anything but msov.modeling has: training code must not
    # rely on the config to switch the cache off.
    model.config.use_cache = True
    return model.train()  # training mode, as in the Trainer (dropout is 0 in this config)


def supervised_token_losses(model, batch: dict):
    """Cross-entropy of every supervised token of `batch`, in row-major order (fp32 whatever the model dtype),
    from the logits the Trainer's loss uses."""
    import torch.nn.functional as F

    from mistral_sov.train.trainer import supervised_logits

    outputs, targets = supervised_logits(model, batch)
    return F.cross_entropy(outputs.logits.float(), targets, reduction="none")


def per_row(token_losses, rows, order):
    """Mean loss of each row, read back from the row-major token losses of a batch laid out in `order`."""
    out, start = {}, 0
    for i in order:
        count = sum(label != IGNORE for label in rows[i]["labels"][1:])
        out[i] = token_losses[start:start + count].mean().item()
        start += count
    assert start == len(token_losses)
    return out


# --- layout --------------------------------------------------------------------------------------------------


def test_pack_rows_fills_bins_within_capacity_and_keeps_every_row_once():
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 20))]
        bins = pack_rows(lengths, 128)
        assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in members) <= 128 for members in bins)
        assert len(bins) <= 11 / 9 * -(-sum(lengths) // 128) + 1  # first-fit-decreasing's bound
        assert pack_rows(lengths, 128) == bins  # deterministic
    # First-fit-decreasing needs 3 bins ([90], [60, 50], [40]); spread over 3, the largest holds 90, not 110.
    assert pack_rows([90, 60, 50, 40], 128) == [[0], [1], [2, 3]]
    assert pack_rows([300, 5], 128) == [[0], [1]]  # an overlong row travels alone


def test_collator_restarts_positions_and_never_predicts_across_rows(rows):
    batch_rows, pad = rows
    batch = PackingCollator(pad_token_id=pad, max_seq_len=CAPACITY)(batch_rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions carry the rows
    bins = packed_layout([len(r["input_ids"]) for r in batch_rows], CAPACITY)
    assert batch["input_ids"].shape == (len(bins), max(sum(len(batch_rows[i]["input_ids"]) for i in b) for b in bins))
    assert 1 < len(bins) < len(batch_rows)
    for b, members in enumerate(bins):
        ids, labels, pos = (batch[k][b].tolist() for k in ("input_ids", "labels", "position_ids"))
        start = 0
        for i in members:
            row = batch_rows[i]
            n = len(row["input_ids"])
            assert ids[start:start + n] == row["input_ids"]
            assert pos[start:start + n] == list(range(n))
            assert labels[start] == IGNORE  # the first token of a row is not predicted from the row before
            assert labels[start + 1:start + n] == row["labels"][1:]  # a row's labels stay inside the row
            start += n
        assert ids[start:] == [pad] * (len(ids) - start) and labels[start:] == [IGNORE] * (len(ids) - start)
        assert pos[start:] == list(range(len(ids) - start))  # padding is a segment of its own
    flat = PackingCollator(pad_token_id=pad, max_seq_len=CAPACITY, flatten=True)(batch_rows)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in batch_rows))


# --- the model really keeps rows apart -------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_one_by_one(tiny_model, rows, attn):
    """The per-row losses of a packed batch equal those of each row alone (fp32, 1e-5), through the code path
    training uses, on a model whose config asks for a cache."""
    import torch

    batch_rows, pad = rows
    model = load(tiny_model, attn)
    collate = PackingCollator(pad_token_id=pad, max_seq_len=CAPACITY)
    with torch.no_grad():
        alone = {i: per_row(supervised_token_losses(model, collate([row])), [row], [0])[0]
                 for i, row in enumerate(batch_rows)}
        order = [i for members in packed_layout([len(r["input_ids"]) for r in batch_rows], CAPACITY)
                 for i in members]
        packed = per_row(supervised_token_losses(model, collate(batch_rows)), batch_rows, order)
    assert max(abs(packed[i] - alone[i]) for i in alone) < 1e-5, (packed, alone)


def test_without_the_safeguards_rows_leak_into_each_other(tiny_model, rows):
    """The test above has teeth: with a KV cache, or without position_ids, the same packed batch gives other
    losses, silently (transformers 5.24 drops the block-diagonal mask in both cases)."""
    import torch
    import torch.nn.functional as F

    batch_rows, pad = rows
    model = load(tiny_model)
    batch = PackingCollator(pad_token_id=pad, max_seq_len=CAPACITY)(batch_rows)
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)

    def losses(**inputs):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], **inputs).logits
        return F.cross_entropy(logits[targets != IGNORE], targets[targets != IGNORE], reduction="none")

    safe = losses(position_ids=batch["position_ids"], use_cache=False)
    with_cache = losses(position_ids=batch["position_ids"])  # the config says use_cache=True
    no_positions = losses(use_cache=False)
    assert (with_cache - safe).abs().max() > 1e-3
    assert (no_positions - safe).abs().max() > 1e-3


def test_trainer_loss_equals_hf_loss_on_the_padded_batch(tiny_model, rows, tmp_path):
    """msov's loss (logits at supervised positions only, packed) is the number HF computes the usual way."""
    import torch

    from mistral_sov.recipe import TrainSection
    from mistral_sov.train.trainer import build_trainer, make_collator

    batch_rows, pad = rows
    model = load(tiny_model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trainer = build_trainer(model, tokenizer, None, None, TrainSection(max_seq_len=CAPACITY), tmp_path,
                            lambda *_: None)
    model.config.use_cache = True  # the Trainer switched it off in the config; compute_loss must not need that
    packed = trainer.data_collator(batch_rows)
    padded = make_collator(tokenizer)(batch_rows)
    with torch.no_grad():
        ours = trainer.compute_loss(model, packed)
        reference = model(**padded, use_cache=False).loss
    assert abs(ours.item() - reference.item()) < 1e-5


# --- training --------------------------------------------------------------------------------------------------


def _losses(tiny_model, tmp_path, name, write_recipe, **overrides):
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    data = small_recipe(tiny_model, tmp_path / name, max_steps=4, logging_steps=1, group_by_length=False,
                        **overrides.pop("train", {}))
    data["data"].update(overrides.pop("data", {}))
    data["data"]["eval"] = []
    finetune(load_recipe(write_recipe(data, f"{name}.yaml")))
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_packed_training_follows_the_unpacked_run(tiny_model, tmp_path, write_recipe):
    """Packing changes the layout of a batch, not what a step learns: same losses step by step, also with
    gradient checkpointing on."""
    unpacked = _losses(tiny_model, tmp_path, "unpacked", write_recipe, data={"packing": False})
    packed = _losses(tiny_model, tmp_path, "packed", write_recipe)
    checkpointed = _losses(tiny_model, tmp_path, "ckpt", write_recipe, train={"gradient_checkpointing": True})
    assert len(unpacked) == len(packed) == len(checkpointed) == 4
    assert packed == pytest.approx(unpacked, abs=1e-4)
    assert checkpointed == pytest.approx(packed, abs=1e-4)
    assert packed[-1] < packed[0]


def test_training_arguments_group_lengths_only_without_packing_and_never_cache(tmp_path):
    from mistral_sov.recipe import TrainSection
    from mistral_sov.train.trainer import training_arguments

    train = TrainSection()
    assert training_arguments(train, tmp_path, has_eval=False, packing=True).train_sampling_strategy == "random"
    assert training_arguments(train, tmp_path, has_eval=False, packing=False).train_sampling_strategy == \
        "group_by_length"
    assert training_arguments(train, tmp_path, has_eval=False).use_cache is False
    off = TrainSection(group_by_length=False)
    assert training_arguments(off, tmp_path, has_eval=False, packing=False).train_sampling_strategy == "random"


# --- attention row by row inside a bin (no dense block-diagonal mask) -------------------------------------------


def test_row_spans_split_bins_where_positions_restart():
    import torch

    from mistral_sov.data.packing import row_spans

    assert row_spans(torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 0]])) == [[(0, 6)], [(0, 2), (2, 5), (5, 6)]]
    assert row_spans(torch.tensor([[3, 4, 5]])) == [[(0, 3)]]  # a continuing sequence is one row


def test_row_attention_equals_the_dense_mask_in_losses_and_gradients(tiny_model, rows):
    """`packed_sdpa_attention` (SDPA row by row, causal, unmasked) gives the per-row losses of each row alone and
    the gradients of SDPA over the block-diagonal mask (fp32, 1e-5)."""
    import torch

    from mistral_sov.data.packing import register_packed_attention

    batch_rows, pad = rows
    name = register_packed_attention()
    assert register_packed_attention() == name  # idempotent
    dense, by_row = load(tiny_model, "sdpa"), load(tiny_model, name)
    collate = PackingCollator(pad_token_id=pad, max_seq_len=CAPACITY)
    batch = collate(batch_rows)
    with torch.no_grad():
        alone = {i: per_row(supervised_token_losses(by_row, collate([row])), [row], [0])[0]
                 for i, row in enumerate(batch_rows)}
    order = [i for members in packed_layout([len(r["input_ids"]) for r in batch_rows], CAPACITY) for i in members]
    losses = {}
    for label, model in (("dense", dense), ("by_row", by_row)):
        token_losses = supervised_token_losses(model, batch)
        token_losses.mean().backward()
        losses[label] = per_row(token_losses.detach(), batch_rows, order)
    assert max(abs(losses["by_row"][i] - alone[i]) for i in alone) < 1e-5
    assert max(abs(losses["by_row"][i] - losses["dense"][i]) for i in alone) < 1e-5
    for (n, a), (_, b) in zip(dense.named_parameters(), by_row.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), n


def test_row_attention_is_plain_sdpa_on_padded_batches(tiny_model, rows):
    """Without restarting positions (a padded, unpacked batch with its attention mask) it is SDPA as it was."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from mistral_sov.data.packing import register_packed_attention
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer

    batch_rows, _ = rows
    tokenizer = load_tokenizer(inspect_model_folder(str(tiny_model)))
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in batch_rows[:4]])
    dense, by_row = load(tiny_model, "sdpa"), load(tiny_model, register_packed_attention())
    with torch.no_grad():
        a, b = supervised_token_losses(dense, batch), supervised_token_losses(by_row, batch)
    assert torch.equal(a, b)
