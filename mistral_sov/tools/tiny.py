"""A tiny Mistral-architecture model and tokenizer, built locally and deterministically from the sample data.

Used by the demo, the tests and the benches: no download, a couple of seconds on a CPU. The tokenizer is a
byte-level BPE trained on every string in the sample files, with Mistral-style chat markers as special tokens
and the chat template in `templates/chat.jinja`. The model is randomly initialised from a seed, in float32,
and written as safetensors only.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..data.readers import iter_strings

# bundled/ links to the repository's data_samples/ and recipes/, and the wheel carries copies of both, so the
# demo runs the same from a checkout and from an installed package.
BUNDLED_DIR: Path = Path(__file__).resolve().parents[1] / "bundled"
DEFAULT_DATA_DIR: Path = BUNDLED_DIR / "data_samples"
DEMO_RECIPE: Path = BUNDLED_DIR / "recipes" / "tiny-demo.yaml"
CHAT_TEMPLATE_PATH: Path = Path(__file__).parents[1] / "templates" / "chat.jinja"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, then the chat markers.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"]

SAMPLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _sample_files(data_dir: Path) -> list[Path]:
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix in SAMPLE_SUFFIXES) \
        if data_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no sample data files ({', '.join(SAMPLE_SUFFIXES)}) in {data_dir}")
    return files


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    yield from iter_strings(json.loads(line))
    elif path.suffix == ".json":
        yield from iter_strings(json.loads(path.read_text(encoding="utf-8-sig")))
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            for row in csv.reader(f):
                yield from (cell for cell in row if cell)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from iter_strings(pq.read_table(path).to_pylist())


def sample_texts(data_dir: Path | None = None) -> list[str]:
    """Every string value of every sample file in `data_dir`, in sorted file order."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    return [text for path in _sample_files(data_dir) for text in _file_texts(path)]


def build_tiny_tokenizer(data_dir: Path | None = None, *, vocab_size: int = 1024):
    """Byte-level BPE trained on the sample files; special tokens first so their ids are fixed.

    No post-processor: encoding adds nothing; the chat template alone writes `<s>` and `</s>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = sample_texts(data_dir)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    return tokenizer


def build_tiny_model(out_dir: Path, *, seed: int = 0, data_dir: Path | None = None, hidden_size: int = 64,
                     num_layers: int = 2, vocab_size: int = 1024) -> Path:
    """Write a random-init Mistral model (safetensors) with its tokenizer to `out_dir`, atomically.

    Same seed and same data give byte-identical files. `out_dir` may not exist yet or be an empty folder;
    a folder with content raises FileExistsError and is left untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder")
    tokenizer = build_tiny_tokenizer(data_dir, vocab_size=vocab_size)

    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM
    from transformers.utils import logging as hf_logging

    heads = 4
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden_size // heads,
        max_position_embeddings=2048,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the 0.02 default so LoRA on a random base can sharpen its logits; 0.2 lowers the loss
        # faster but gave worse greedy answers in the demo.
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = MistralForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # library code never prints; restored below
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for stray in tmp.glob("*.bin"):  # safetensors only, whatever the library version defaults to
            stray.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return out_dir
