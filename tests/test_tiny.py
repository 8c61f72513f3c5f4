"""The tiny model builder: deterministic files, safetensors only, a round-tripping tokenizer, the chat template."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_sov.tools.tiny import SPECIAL_TOKENS, build_tiny_model, build_tiny_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The printer PRN-EG-3 is jammed."},
    {"role": "assistant", "content": "Open the front door."},
]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tiny_model, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    first = digests(tiny_model)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(first)
    assert digests(again) == first
    assert digests(other)["model.safetensors"] != first["model.safetensors"]
    assert digests(other)["tokenizer.json"] == first["tokenizer.json"]
    assert not list(tiny_model.glob("*.bin")) and not list(tmp_path.glob("*.tmp-*"))


def test_loads_offline_with_auto_classes(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "mistral" and model.config.vocab_size == len(tok)
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))


def test_tokenizer_round_trips_and_adds_nothing(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "Hi Vera. Open NorvaleConnect, pick  vpn-east.\n\nCafé 🙂 [not special]"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode(text) == ids  # no BOS added behind the template's back


def test_chat_template_renders_with_single_special_ids(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == "<s>[SYS]Be brief.[/SYS][INST]The printer PRN-EG-3 is jammed.[/INST]Open the front door.</s>"
    tokens = tok.convert_ids_to_tokens(tok(rendered, add_special_tokens=False)["input_ids"])
    for marker in ("<s>", "[SYS]", "[/SYS]", "[INST]", "[/INST]", "</s>"):
        assert tokens.count(marker) == 1, marker
    assert tokens[0] == "<s>" and tokens[-1] == "</s>"


def test_existing_folder_with_content_is_refused_and_untouched(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model"):
        build_tiny_model(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob("*.tmp-*"))


def test_empty_existing_folder_is_replaced(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert build_tiny_model(target, hidden_size=32, num_layers=1) == target
    assert (target / "model.safetensors").is_file()


def test_no_sample_files_is_file_not_found(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing usable")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_tiny_tokenizer(tmp_path)


def test_importing_tiny_stays_light():
    code = ("import sys, mistral_sov.tools.tiny; heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'pyarrow') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
