"""On CUDA only (skipped without it): QLoRA and LoRA steps on a locally built model of a few hundred million
parameters, recording peak GPU memory and tokens/s and checking `msov plan`'s estimate against the peak.

Run on a GPU machine with `pytest -m gpu -s tests/test_gpu.py`; each test prints one JSON line of measurements and
appends it to $MSOV_GPU_REPORT when that is set.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import small_recipe

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ~284M parameters: Mistral block shapes (GQA 4:1, SwiGLU 3.5x), a real-size 32k vocabulary.
SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)


@pytest.fixture(scope="module")
def mid_model(tiny_model, tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    out = tmp_path_factory.mktemp("gpu") / "mid"
    config = MistralConfig(**SHAPE, max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / name, out / name)
    return out


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    from mistral_sov.tools.tiny import sample_texts

    text = " ".join(sample_texts())
    path = tmp_path_factory.mktemp("gpu-data") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": text[i * 12000:(i + 1) * 12000]}) + "\n" for i in range(16)))
    return path


def measure(model_dir, data_path, tmp_path, *, quantization=None, lora=None, steps=10, **train):
    """Train `steps` steps; return the peak GPU memory of training, tokens/s and the plan's estimate."""
    from mistral_sov.model.load import attach_lora, load_model
    from mistral_sov.model.memory import plan_recipe
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import prepare_inputs
    from mistral_sov.train.trainer import build_trainer

    data = small_recipe(model_dir, tmp_path / "out", max_steps=steps, logging_steps=1, lr=1e-4, **train)
    data["model"]["dtype"] = "bfloat16"
    data["data"] = {"train": [{"path": str(data_path), "format": "completion"}]}
    data["lora"].update(lora or {})
    if quantization:
        data["quantization"] = quantization
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    recipe = load_recipe(tmp_path / "r.yaml")
    plan = plan_recipe(recipe, gpu_mem="1000GB")
    prepared = prepare_inputs(recipe)
    assert min(len(r) for r in prepared.train.dataset["input_ids"]) == recipe.train.max_seq_len

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = attach_lora(load_model(prepared.folder, recipe.model, quantization=recipe.quantization,
                                   gradient_checkpointing=recipe.train.gradient_checkpointing), recipe.lora)
    (tmp_path / "work").mkdir(exist_ok=True)
    trainer = build_trainer(model, prepared.tokenizer, prepared.train.dataset, None, recipe.train,
                            tmp_path / "work", lambda *_: None)
    torch.cuda.synchronize()
    started = time.perf_counter()
    output = trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = steps * recipe.train.batch_size * recipe.train.grad_accum * recipe.train.max_seq_len
    record = {
        "gpu": torch.cuda.get_device_name(0),
        "quantization": plan["settings"]["quantization"],
        "parameters": plan["parameters"]["total"],
        "batch": recipe.train.batch_size, "seq": recipe.train.max_seq_len,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "peak_allocated_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "plan_peak_gib": round(plan["memory"]["peak"] / 2**30, 3),
        "plan_total_gib": round(plan["memory"]["total"] / 2**30, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "final_loss": output.training_loss,
    }
    record["plan_error"] = round(record["plan_peak_gib"] / record["peak_allocated_gib"] - 1, 3)
    print(json.dumps(record))
    if os.environ.get("MSOV_GPU_REPORT"):
        with Path(os.environ["MSOV_GPU_REPORT"]).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    del trainer, model
    torch.cuda.empty_cache()
    return record


NF4_BF16 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_qlora_steps_memory_and_speed(mid_model, long_rows, tmp_path, checkpointing, record_property):
    record = measure(mid_model, long_rows, tmp_path, quantization=NF4_BF16, batch_size=4, max_seq_len=512,
                     dtype="bf16", gradient_checkpointing=checkpointing)
    for key, value in record.items():
        record_property(key, value)
    assert record["tokens_per_s"] > 0 and record["final_loss"] == record["final_loss"]  # finite
    assert abs(record["plan_error"]) <= 0.3, record  # the README states the measured error


def test_lora_bf16_steps_memory_and_speed(mid_model, long_rows, tmp_path, record_property):
    record = measure(mid_model, long_rows, tmp_path, batch_size=4, max_seq_len=512, dtype="bf16")
    for key, value in record.items():
        record_property(key, value)
    assert abs(record["plan_error"]) <= 0.3, record


def test_dora_on_8bit_trains_on_cuda(tiny_model, tmp_path, write_recipe):
    """msov refuses DoRA on 8-bit on CPU (bitsandbytes fails there); on CUDA it must really train."""
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    data = small_recipe(tiny_model, tmp_path / "out", max_steps=4, logging_steps=1)
    data["quantization"] = {"bits": 8}
    data["lora"]["use_dora"] = True
    summary = finetune(load_recipe(write_recipe(data)))
    assert summary.train.steps == 4 and summary.train.final_loss < summary.train.first_loss
