"""Token-exact for Mistral: msov's training ids and masks against mistral-common's, on the real tokenizers it ships,
and Mistral-shaped model folders (real tokenizers, Mistral's v0.3 template, tiny random weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mistral_common
import pytest
from conftest import REPO, SAMPLES, small_recipe

from mistral_sov.data import load_data_file, tokenize_records
from mistral_sov.errors import DataError
from mistral_sov.model.mistral_native import load_mistral_tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
TEMPLATE = REPO.parent / "shared" / "mistral" / "mistral-7b-instruct-v0.3.chat_template.jinja"
FILES = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
         "v7": "mistral_instruct_tokenizer_241114.model.v7", "tekken-240718": "tekken_240718.json",
         "tekken-240911": "tekken_240911.json"}
IGNORE = -100

TOOLS = [{"type": "function", "function": {
    "name": "ticket_status", "description": "Status of a helpdesk ticket",
    "parameters": {"type": "object", "properties": {"ticket": {"type": "string"}}, "required": ["ticket"]}}}]


def _call(call_id: str, ticket: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "ticket_status", "arguments": json.dumps({"ticket": ticket})}}


PLAIN = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Printer jammed."},
     {"role": "assistant", "content": "Open the tray."}, {"role": "user", "content": "Still jammed."},
     {"role": "assistant", "content": "Call support."}],
    [{"role": "system", "content": "Réponds en français.\nToujours."}, {"role": "user", "content": "Grüße 日本語 🙂"},
     {"role": "assistant", "content": "Ligne 1\nLigne 2\n\n  indentée"}],
    [{"role": "user", "content": "What is [INST] ? and </s> and <s> and [TOOL_CALLS]"},
     {"role": "assistant", "content": "Text: [/INST] </s> <s>struck</s> [TOOL_CALLS] [AVAILABLE_TOOLS]"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "skip me", "weight": 0},
     {"role": "user", "content": "two"}, {"role": "assistant", "content": "learn me"}],
]
WITH_TOOLS = [
    {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are the helpdesk."}, {"role": "user", "content": "Status of T-42?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("abcdefghi", "T-42")]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": json.dumps({"status": "open [INST]"})},
        {"role": "assistant", "content": "T-42 is open."}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Status of T-1?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("a1b2c3d4e", "T-1")]},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "closed"},
        {"role": "assistant", "content": "T-1 is closed."}, {"role": "user", "content": "And T-2?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("z9y8x7w6v", "T-2")]},
        {"role": "tool", "tool_call_id": "z9y8x7w6v", "content": "open"},
        {"role": "assistant", "content": "T-2 is open."}]},
]


@pytest.fixture(scope="module")
def mistral_tokenizers():
    return {name: load_mistral_tokenizer(DATA / file) for name, file in FILES.items()}


def _reference(tokenizer, record: dict) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]
    return tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=record.get("tools"))
                                            ).tokens


def _runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("name", list(FILES))
def test_ids_and_mask_equal_mistral_common(mistral_tokenizers, name):
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    mistral = mistral_tokenizers[name]
    raw = mistral.instruct_tokenizer.tokenizer
    records = [{"messages": m} for m in PLAIN] + ([] if name == "v1" else WITH_TOOLS)
    data = tokenize_records(records, SimpleNamespace(msov_mistral=mistral), max_seq_len=4096)
    assert data.stats.rows_out == len(records)
    for record, row in zip(records, data.dataset):
        ids, labels = row["input_ids"], row["labels"]
        assert ids == _reference(mistral, record)
        answers = [m for m in record["messages"] if m["role"] == "assistant" and m.get("weight", 1)]
        runs = _runs(labels)
        assert len(runs) == len(answers)  # every learned answer, nothing else
        for run, answer in zip(runs, answers):
            assert run[-1] == raw.eos_id and run.count(raw.eos_id) == 1  # its EOS, and no EOS from its text
            text = raw.decode(run, special_token_policy=SpecialTokenPolicy.KEEP)
            if answer.get("tool_calls"):
                assert text.startswith("[TOOL_CALLS]") and answer["tool_calls"][0]["id"] in text
            else:
                assert run[:-1] == raw.encode(answer["content"], bos=False, eos=False)
        # Literal special-token text stays text: one BOS, one EOS per answer.
        assert ids.count(raw.bos_id) == 1
        assert ids.count(raw.eos_id) == sum(m["role"] == "assistant" for m in record["messages"])
        for message in record["messages"]:
            if message["role"] == "system":  # where this version puts it, but present
                assert raw.encode(message["content"].split("\n")[0], bos=False, eos=False)[1:] != []
                assert message["content"].split("\n")[0] in raw.decode(ids)


def test_v1_refuses_tools_by_name(mistral_tokenizers):
    with pytest.raises(DataError, match=r"conversation 1 .*Mistral's tokenizer \(v1\) cannot encode it"):
        tokenize_records([WITH_TOOLS[0]], SimpleNamespace(msov_mistral=mistral_tokenizers["v1"]), max_seq_len=512)


def _mistral_folder(root: Path, tokenizer_file: str, *, hf_tokenizer: bool) -> Path:
    """A folder shaped like a Mistral download: config.json, tiny random weights, the real tokenizer file."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    root.mkdir(parents=True)
    is_tekken = tokenizer_file.endswith(".json")
    shutil.copy(DATA / tokenizer_file, root / ("tekken.json" if is_tekken else "tokenizer.model.v3"))
    if hf_tokenizer:
        staging = root.parent / f"{root.name}-hf"
        staging.mkdir()
        shutil.copy(DATA / tokenizer_file, staging / "tokenizer.model")
        tok = AutoTokenizer.from_pretrained(staging)
        tok.chat_template = TEMPLATE.read_text(encoding="utf-8")
        tok.save_pretrained(root)
    vocab = 131072 if is_tekken else 32768
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096)
    MistralForCausalLM(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def v03_folder(tmp_path_factory) -> Path:
    return _mistral_folder(tmp_path_factory.mktemp("mistral") / "Mistral-7B-Instruct-v0.3",
                           FILES["v3"], hf_tokenizer=True)


def test_helpdesk_recipe_data_tokenises_with_system_prompts(v03_folder, mistral_tokenizers):
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer
    from mistral_sov.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "mistral-7b-lora.yaml")
    tokenizer = load_tokenizer(inspect_model_folder(str(v03_folder)))
    assert tokenizer.msov_mistral is not None
    loaded = load_data_file(recipe.data.train[0].path, "chat")
    data = tokenize_records(loaded.records, tokenizer, max_seq_len=recipe.train.max_seq_len)
    assert data.stats.rows_out == loaded.rows == 300
    raw = mistral_tokenizers["v3"].instruct_tokenizer.tokenizer
    with_system = [(r, row) for r, row in zip(loaded.records, data.dataset) if r["messages"][0]["role"] == "system"]
    assert len(with_system) == 253
    for record, row in with_system[:20]:
        assert row["input_ids"] == _reference(mistral_tokenizers["v3"], record)
        assert record["messages"][0]["content"] in raw.decode(row["input_ids"])


@pytest.fixture(scope="module")
def v03_run(v03_folder, tmp_path_factory):
    import yaml

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    root = tmp_path_factory.mktemp("v03-run")
    data = small_recipe(v03_folder, root / "out", max_steps=2, batch_size=4, max_seq_len=256)
    data["data"] = {"train": [{"path": str(SAMPLES / "helpdesk_chat.jsonl"), "format": "chat"}]}
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    return finetune(load_recipe(root / "r.yaml")), root / "out"


def test_helpdesk_recipe_trains_on_a_v03_shaped_folder(v03_run):
    summary, out = v03_run
    assert summary.train.steps == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_export_format_mistral_converts_back_to_the_hf_export(v03_run, tmp_path, cli):
    _, run = v03_run
    key = tmp_path / "key"
    assert cli("keygen", "--out", str(key)).exit_code == 0
    hf, native, back = tmp_path / "hf", tmp_path / "native", tmp_path / "back"
    assert cli("export", str(run), "--merge", "--out", str(hf)).exit_code == 0
    result = cli("export", str(run), "--merge", "--format", "mistral", "--out", str(native), "--key",
                 f"{key}.pem", "--json")
    assert result.exit_code == 0, result.output
    names = {p.name for p in native.iterdir()}
    assert {"consolidated.safetensors", "params.json", "tokenizer.model.v3"} <= names
    assert not names & {"config.json", "model.safetensors"}
    verified = cli("verify", str(native), "--key", f"{key}.pub", "--json")
    assert verified.exit_code == 0, verified.output
    assert cli("convert", str(native), "--out", str(back)).exit_code == 0
    import torch

    assert torch.allclose(_logits(back), _logits(hf), atol=1e-6)


def test_tekken_only_folder_loads(tmp_path):
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer

    folder = _mistral_folder(tmp_path / "nemo", FILES["tekken-240911"], hf_tokenizer=False)
    assert not (folder / "tokenizer.json").exists()
    tokenizer = load_tokenizer(inspect_model_folder(str(folder)))
    record = {"messages": PLAIN[1]}
    row = tokenize_records([record], tokenizer, max_seq_len=512).dataset[0]
    assert row["input_ids"] == _reference(tokenizer.msov_mistral, record)


def _logits(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 1091, 2380, 29473, 1522, 781, 4392]])).logits


def test_native_out_and_back_gives_the_same_logits(v03_folder, tmp_path):
    from mistral_sov.model.mistral_native import convert_native, write_native

    native, back = tmp_path / "native", tmp_path / "back"
    native.mkdir()
    back.mkdir()
    config = json.loads((v03_folder / "config.json").read_text())
    written = write_native(v03_folder, config, native)
    shutil.copy(v03_folder / "tokenizer.model.v3", native)
    assert sorted(p.name for p in native.iterdir()) == ["consolidated.safetensors", "params.json",
                                                        "tokenizer.model.v3"]
    from safetensors import safe_open

    with safe_open(native / "consolidated.safetensors", "pt") as handle:
        assert "layers.0.attention.wq.weight" in handle.keys() and "tok_embeddings.weight" in handle.keys()
    record = convert_native(native, back)
    assert record["read"]["consolidated.safetensors"] == written["consolidated.safetensors"]
    assert len(record["written"]["model.safetensors"]) == 64
    import torch

    assert torch.equal(_logits(back), _logits(v03_folder))


def test_native_folder_is_pointed_at_convert_and_pickle_refused(tmp_path):
    from mistral_sov.errors import ModelFolderError
    from mistral_sov.model.load import inspect_model_folder
    from mistral_sov.model.mistral_native import convert_native

    folder = tmp_path / "native"
    folder.mkdir()
    (folder / "params.json").write_text("{}")
    shutil.copy(DATA / FILES["v3"], folder / "tokenizer.model.v3")
    (folder / "consolidated.00.pth").write_bytes(b"not unpickled")
    with pytest.raises(ModelFolderError, match="pickle"):
        convert_native(folder, tmp_path / "out")
    (folder / "consolidated.00.pth").unlink()
    (folder / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="native Mistral folder") as info:
        inspect_model_folder(str(folder))
    assert "msov convert" in info.value.hint


def test_cli_convert_and_data_show(v03_folder, tmp_path, cli, write_recipe):
    from mistral_sov.model.mistral_native import write_native

    native = tmp_path / "native"
    native.mkdir()
    write_native(v03_folder, json.loads((v03_folder / "config.json").read_text()), native)
    shutil.copy(v03_folder / "tokenizer.model.v3", native)
    result = cli("convert", str(native), "--out", str(tmp_path / "hf"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["read"]) == {"consolidated.safetensors", "params.json", "tokenizer.model.v3"}
    assert (tmp_path / "hf" / "msov-convert.json").is_file() and (tmp_path / "hf" / "config.json").is_file()
    again = cli("convert", str(native), "--out", str(tmp_path / "hf"), "--json")
    assert again.exit_code == 3 and json.loads(again.stdout)["status"] == "error"

    recipe = write_recipe(small_recipe(v03_folder, tmp_path / "out", max_seq_len=512))
    shown = cli("data", "show", str(recipe), "--rows", "2", "--json")
    assert shown.exit_code == 0, shown.output
    rows = json.loads(shown.stdout)["rows"]
    assert len(rows) == 2 and rows[0]["supervised_tokens"] == sum(rows[0]["supervised"]) > 0
    assert rows[0]["text"].startswith("<s>[INST]") and len(rows[0]["ids"]) == rows[0]["tokens"]
    plain = cli("data", "show", str(recipe), "--rows", "1")
    assert plain.exit_code == 0 and "supervised" in plain.stdout


def test_data_tokenizer_template_on_mistrals_own_template(v03_folder, tiny_model):
    from mistral_sov.errors import ModelFolderError
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer

    tokenizer = load_tokenizer(inspect_model_folder(str(v03_folder)), of_record="template")
    assert getattr(tokenizer, "msov_mistral", None) is None
    records = load_data_file(SAMPLES / "helpdesk_chat.jsonl", "chat").records
    # The v0.3 template places the system prompt only when the conversation ends with a user turn: a training
    # conversation loses it. That is an error naming the row, never silence, whatever is trained on.
    for train_on in ("completion", "all"):
        with pytest.raises(DataError, match=r"conversation 1 .*message 0 \(system\) is not in the text"):
            tokenize_records(records[:1], tokenizer, max_seq_len=2048, train_on=train_on)
    plain = [r for r in records if r["messages"][0]["role"] != "system"][:10]
    data = tokenize_records(plain, tokenizer, max_seq_len=2048)
    for record, row in zip(plain, data.dataset):
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(run).strip() for run in _runs(row["labels"])] == [f"{a}</s>" for a in answers]
    with pytest.raises(ModelFolderError, match="data.tokenizer: mistral"):
        load_tokenizer(inspect_model_folder(str(tiny_model)), of_record="mistral")


@pytest.mark.parametrize("name", ["v3", "tekken-240911"])
def test_completion_rows_are_the_tokenizers_own_encoding(name, tmp_path, mistral_tokenizers):
    from transformers import AutoTokenizer

    is_tekken = name.startswith("tekken")
    shutil.copy(DATA / FILES[name], tmp_path / ("tekken.json" if is_tekken else "tokenizer.model"))
    # The Hugging Face path (as a release's tokenizer_config.json names them), and the Mistral one.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, bos_token="<s>", eos_token="</s>")
    raw = mistral_tokenizers[name].instruct_tokenizer.tokenizer
    for of_record in (tokenizer, SimpleNamespace(msov_mistral=mistral_tokenizers[name], is_fast=True)):
        for prompt, completion in [("Ticket NS-1 is", " closed."), ("Grüße\n", "日本語 🙂"), ("a </s>", " <s>b")]:
            row = tokenize_records([{"prompt": prompt, "completion": completion}], of_record,
                                   max_seq_len=64).dataset[0]
            assert row["input_ids"] == raw.encode(prompt + completion, bos=True, eos=True)
            assert row["input_ids"].count(raw.eos_id) == 1
            learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
            assert learned[-1] == raw.eos_id and raw.decode(learned).strip() == completion.strip()


def test_nemo_like_folder_with_tokenizer_json_loads(tmp_path):
    from transformers import AutoTokenizer

    from mistral_sov.model.load import inspect_model_folder, load_tokenizer

    folder = _mistral_folder(tmp_path / "nemo", FILES["tekken-240911"], hf_tokenizer=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    shutil.copy(folder / "tekken.json", staging)
    AutoTokenizer.from_pretrained(staging, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and (folder / "tekken.json").is_file()
    tokenizer = load_tokenizer(inspect_model_folder(str(folder)))
    records = [{"messages": PLAIN[2]}, {"prompt": "Ticket", "completion": " closed"}]
    data = tokenize_records(records, tokenizer, max_seq_len=512)
    assert data.stats.rows_out == 2
    assert data.dataset[0]["input_ids"] == _reference(tokenizer.msov_mistral, records[0])


def _hostile_native(tmp_path: Path, params: str, weights: bytes | None = None) -> Path:
    folder = tmp_path / "hostile"
    folder.mkdir(exist_ok=True)
    (folder / "params.json").write_text(params)
    shutil.copy(DATA / FILES["v3"], folder / "tokenizer.model.v3")
    if weights is not None:
        (folder / "consolidated.safetensors").write_bytes(weights)
    return folder


GOOD_PARAMS = json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 16,
                          "norm_eps": 1e-5, "vocab_size": 32})


@pytest.mark.parametrize("params, weights, match", [
    ("{not json", None, "params.json"),
    ("[1, 2]", None, "params.json"),
    (json.dumps({"dim": 8, "n_layers": 1, "n_heads": 0, "hidden_dim": 16, "norm_eps": 1e-5, "vocab_size": 32}),
     None, "n_heads"),
    (json.dumps({"dim": 8, "n_layers": "1", "n_heads": 2, "hidden_dim": 16, "norm_eps": 1e-5, "vocab_size": 32}),
     None, "n_layers"),
    (json.dumps({"dim": 9, "n_layers": 1, "n_heads": 2, "hidden_dim": 16, "norm_eps": 1e-5, "vocab_size": 32}),
     None, "dim"),
    (GOOD_PARAMS, b"\xff" * 64, "consolidated.safetensors"),
    (GOOD_PARAMS, (40).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [1]}}   ', "consolidated"),
])
def test_convert_refuses_hostile_native_folders_with_exit_3(tmp_path, cli, params, weights, match):
    import torch
    from safetensors.torch import save_file

    folder = _hostile_native(tmp_path, params, weights)
    if weights is None:
        save_file({"norm.weight": torch.ones(8)}, str(folder / "consolidated.safetensors"))
    result = cli("convert", str(folder), "--out", str(tmp_path / "hf"), "--json")
    assert result.exit_code == 3, result.output
    document = json.loads(result.stdout)
    assert document["status"] == "error" and match in document["error"]
    assert not (tmp_path / "hf").exists()


def test_convert_refuses_symlinks_and_output_inside_input(tmp_path, cli):
    import torch
    from safetensors.torch import save_file

    real = tmp_path / "real.safetensors"
    save_file({"norm.weight": torch.ones(8)}, str(real))
    folder = _hostile_native(tmp_path, GOOD_PARAMS)
    (folder / "consolidated.safetensors").symlink_to(real)
    result = cli("convert", str(folder), "--out", str(tmp_path / "hf"))
    assert result.exit_code == 3 and "symlink" in result.output, result.output
    (folder / "consolidated.safetensors").unlink()
    shutil.copy(real, folder / "consolidated.safetensors")
    result = cli("convert", str(folder), "--out", str(folder / "hf"))
    assert result.exit_code == 3 and "inside" in result.output, result.output
    # A tensor of a layer params.json does not have is refused, not silently written.
    save_file({"layers.7.attention_norm.weight": torch.ones(8)}, str(folder / "consolidated.safetensors"))
    result = cli("convert", str(folder), "--out", str(tmp_path / "hf"))
    assert result.exit_code == 3 and "n_layers" in result.output, result.output


@pytest.mark.parametrize("name", ["v3", "tekken-240911"])
def test_generation_prompt_is_mistral_commons_encoding(mistral_tokenizers, name):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_sov.model.mistral_native import encode_chat, encode_prompt

    conversation = PLAIN[1]
    prompt = conversation[:-1]
    ids = encode_prompt(mistral_tokenizers[name], prompt)
    serving = MistralTokenizer.from_file(str(DATA / FILES[name]), mode=ValidationMode.test)
    assert ids == serving.encode_chat_completion(ChatCompletionRequest.from_openai(prompt)).tokens
    trained, labels = encode_chat(mistral_tokenizers[name], {"messages": conversation}, 1)
    first_learned = max(i for i, label in enumerate(labels) if label == IGNORE and i < len(ids)) + 1
    assert trained[:len(ids)] == ids and first_learned == len(ids)  # the model answers where training learned


def test_lone_surrogate_and_megabyte_text_through_mistral_common(mistral_tokenizers):
    mistral = mistral_tokenizers["v3"]
    bad = [{"role": "user", "content": "a\ud800"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="message 0.*surrogate"):
        tokenize_records([{"messages": bad}], SimpleNamespace(msov_mistral=mistral), max_seq_len=64)
    big = [{"role": "user", "content": "word " * 200_000}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(DataError, match="no training rows"):  # truncated to the prompt: nothing left to learn
        tokenize_records([{"messages": big}], SimpleNamespace(msov_mistral=mistral), max_seq_len=64)


def test_generate_reply_feeds_the_model_mistral_commons_prompt(v03_folder, mistral_tokenizers):
    import torch
    from transformers import MistralForCausalLM

    from mistral_sov.evaluate import generate_reply
    from mistral_sov.model.load import inspect_model_folder, load_tokenizer
    from mistral_sov.model.mistral_native import encode_prompt

    tokenizer = load_tokenizer(inspect_model_folder(str(v03_folder)))
    model = MistralForCausalLM.from_pretrained(v03_folder)
    seen = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Printer jammed."}]
    generate_reply(model, tokenizer, prompt, max_new_tokens=1)
    assert seen[0][0].tolist() == encode_prompt(tokenizer.msov_mistral, prompt)
    assert torch.is_tensor(seen[0])
