"""A tiny Mistral-architecture model and tokenizer, built locally in seconds: what tests, the demo and benches use.

Deterministic: the same seed and the same sample data give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data_samples"
CHAT_TEMPLATE_PATH = Path(__file__).parent / "templates" / "chat.jinja"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"]
_SAMPLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def sample_texts(data_dir: Path) -> list[str]:
    """Every string value of every sample file, in sorted file order (the tokenizer's training corpus)."""
    files = sorted(p for p in Path(data_dir).glob("*") if p.suffix in _SAMPLE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no sample data files (*.jsonl, *.json, *.csv, *.parquet) in {data_dir}")
    texts: list[str] = []
    for path in files:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        texts.extend(_strings(rows))
    return texts


def build_tiny_tokenizer(data_dir: Path | None = None, *, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = sample_texts(data_dir or DEFAULT_DATA_DIR)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:], chat_template=CHAT_TEMPLATE_PATH.read_text(),
        model_max_length=2048, clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: Path, *, seed: int = 0, data_dir: Path | None = None, hidden_size: int = 64,
                     num_layers: int = 2, vocab_size: int = 1024) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    tokenizer = build_tiny_tokenizer(data_dir, vocab_size=vocab_size)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir
