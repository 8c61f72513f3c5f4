"""Data: loading every file type, file:line error messages, normalisation, and loss masks token by token."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_sov.data import FORMATS, detect_format, load_data_file, render_prompt, tokenize_records
from mistral_sov.errors import DataError

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "My printer is jammed."},
    {"role": "assistant", "content": "Open the tray."},
    {"role": "user", "content": "Still jammed."},
    {"role": "assistant", "content": "Call support."},
]


@pytest.fixture(scope="module")
def tok():
    from mistral_sov.tools.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def problems_of(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as info:
        load_data_file(path, fmt)
    assert info.value.exit_code == 3
    assert "msov data validate" in info.value.hint
    return info.value.message


def supervised(row: dict) -> list[int]:
    return [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]


# ---- loading and normalising -------------------------------------------------------------------------------


def test_jsonl_chat_loads_normalises_and_hashes(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [dict(m, name="x") for m in CONVERSATION], "id": 7}) + "\n\n"
                    + json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    loaded = load_data_file(path)
    assert loaded.format == "chat" and loaded.rows == 2 == len(loaded.records)
    assert loaded.records[0] == {"messages": CONVERSATION}  # extra fields dropped
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.places == ["1", "3"]


def test_json_array_and_wrapped_object_of_instructions(tmp_path):
    rows = [{"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
            {"instruction": "Say hi.", "input": None, "output": "Hi."},
            {"instruction": "Say bye.", "output": "Bye.", "source": "ignored"}]
    for document in (rows, {"version": 1, "data": rows}):
        path = tmp_path / "instr.json"
        path.write_text(json.dumps(document, indent=2))
        loaded = load_data_file(path)
        assert loaded.format == "instruction" and loaded.rows == 3
        assert loaded.records[0] == {"messages": [{"role": "user", "content": "Summarise.\n\nA long text."},
                                                  {"role": "assistant", "content": "Short."}]}
        assert loaded.records[1]["messages"][0]["content"] == "Say hi."
        assert loaded.places == (["2", "7", "12"] if document is rows else ["4", "9", "14"])


def test_csv_with_quoted_commas_and_multiline_field(tmp_path):
    path = tmp_path / "instr.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["Reset my password, please", "", "Go to settings, then security."])
        writer.writerow(["Printer\njammed", "", "Open the tray."])
        writer.writerow(["Fix wifi", "router says \"no\"", "Restart it."])
    loaded = load_data_file(path)
    assert loaded.format == "instruction" and loaded.rows == 3
    assert loaded.records[0]["messages"][1]["content"] == "Go to settings, then security."
    assert loaded.records[1]["messages"][0]["content"] == "Printer\njammed"
    assert loaded.records[2]["messages"][0]["content"] == 'Fix wifi\n\nrouter says "no"'
    assert loaded.places == ["2", "3", "5"]


def test_csv_chat_holds_messages_as_json_text(tmp_path):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["messages", "topic"], [json.dumps(CONVERSATION), "printers"]])
    assert load_data_file(path).records == [{"messages": CONVERSATION}]


def test_parquet_chat_and_completion(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]), chat)
    loaded = load_data_file(chat)
    assert (loaded.format, loaded.rows, loaded.records[0]) == ("chat", 2, {"messages": CONVERSATION})

    completion = tmp_path / "completion.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]), completion)
    loaded = load_data_file(completion)
    assert loaded.format == "completion" and loaded.records == [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]


def test_completion_text_rows_normalise_to_empty_prompt(tmp_path):
    loaded = load_data_file(write_jsonl(tmp_path / "c.jsonl", [{"text": "Some prose."}]))
    assert loaded.format == "completion" and loaded.records == [{"prompt": "", "completion": "Some prose."}]


@pytest.mark.parametrize("row, expected", [
    ({"messages": []}, "chat"),
    ({"instruction": "a", "output": "b", "input": ""}, "instruction"),
    ({"text": "a"}, "completion"),
    ({"prompt": "a", "completion": "b"}, "completion"),
    ({"prompt": "a"}, None),
    ({"text": "", "instruction": None}, None),
])
def test_detect_format(row, expected):
    assert detect_format(row) == expected
    assert expected is None or expected in FORMATS


# ---- errors name file, line and field --------------------------------------------------------------------------


def test_bad_role_in_jsonl_names_line_and_field(tmp_path):
    good = {"messages": CONVERSATION[1:3]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad])
    message = problems_of(path)
    assert f"{path}:3: messages[1].role: expected one of system, user, assistant, tool, got 'bot'" in message
    assert "1 problem in 1 row" in message


@pytest.mark.parametrize("messages, field, words", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role", "first message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role", "alternate"),
    ([{"role": "user", "content": "a"}], "messages[0].role", "no assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "messages[2].role", "last message must be from the assistant"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}], "messages[0].content", "non-empty"),
    ([{"role": "user", "content": "a"}, "b"], "messages[1]", "expected an object"),
    ("not json", "messages", "not valid JSON"),
    ([], "messages", "non-empty list"),
])
def test_chat_rules(tmp_path, messages, field, words):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": messages}])
    message = problems_of(path)
    assert f":2: {field}: " in message and words in message


def test_bad_instruction_row_in_csv_names_its_physical_line(tmp_path):
    path = tmp_path / "instr.csv"
    path.write_text('instruction,input,output\n"Two\nlines, with comma",,ok\n\nShort,,\nExtra,,a,b\n')
    message = problems_of(path)
    assert f"{path}:5: output: expected a non-empty string, got an empty string" in message
    assert f"{path}:6: 4 fields, but the header (line 1) names 3" in message


def test_bad_completion_record_in_json_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"data": [\n  {"text": "fine"},\n  {\n    "text": 42\n  },\n  {"prompt": "p"}\n]}\n')
    message = problems_of(path)
    assert f"{path}:3: text: expected a non-empty string, got number 42" in message
    assert f"{path}:6: text: missing, and so are prompt + completion (row has: prompt)" in message


def test_completion_format_rules(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}, {"completion": "b"},
                                              {"text": "t", "prompt": "a", "completion": "b"},
                                              {"prompt": 3, "completion": "b"}])
    message = problems_of(path, "completion")
    assert ":2: prompt: missing" in message and ":3: text: " in message and "both" in message
    assert ":4: prompt: expected a string, got number 3" in message


def test_bad_parquet_row_is_named_by_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "i.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]),
                   path)
    assert f"{path}:row 2: output: missing" in problems_of(path)


def test_invalid_json(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, '{"text": "b",}', "[1, 2]"])
    message = problems_of(path)
    assert f"{path}:2: invalid JSON: " in message and f"{path}:3: expected one JSON object per line" in message

    broken = tmp_path / "x.json"
    broken.write_text('[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(DataError, match=r"x\.json:4: invalid JSON"):
        load_data_file(broken)


def test_more_than_twenty_problems_are_summarised(tmp_path):
    rows = [{"instruction": "ok", "output": "ok"}] + [{"instruction": "", "output": ""}] * 25
    with pytest.raises(DataError) as info:
        load_data_file(write_jsonl(tmp_path / "many.jsonl", rows))
    lines = info.value.message.splitlines()
    assert lines[0].endswith("50 problems in 25 rows (instruction format, detected from line 1):")
    assert len(lines) == 1 + 20 + 1 and lines[1].endswith(":2: instruction: expected a non-empty string, "
                                                          "got an empty string")
    assert lines[-1] == "... and 30 more problems (25 rows affected)"
    assert len(info.value.problems) == 50


def test_rows_of_another_or_no_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"instruction": "i", "output": "o"}])
    assert "looks like instruction format" in problems_of(path)
    assert ":1: messages: missing" in problems_of(path, "chat")
    nothing = write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": "a"}])
    message = problems_of(nothing)
    assert "no known format (row has: question, answer)" in message and "instruction + output" in message


@pytest.mark.parametrize("name, content, words", [
    ("data.txt", "hello", "unsupported data file type '.txt'"),
    ("empty.jsonl", "\n\n", "holds no rows"),
    ("empty.csv", "", "holds no rows"),
    ("one.json", '{"text": "a"}', "single record"),
    ("scalar.json", "3", "expected an array of records"),
    ("bad.parquet", "not parquet", "not a readable Parquet file"),
])
def test_unusable_files(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=words):
        load_data_file(path)
    with pytest.raises(DataError, match="no such data file"):
        load_data_file(tmp_path / "missing.jsonl")


# ---- tokenising and loss masks ----------------------------------------------------------------------------------


def test_chat_labels_cover_exactly_the_answers_and_their_eos(tok):
    data = tokenize_records([{"messages": CONVERSATION}], tok, max_seq_len=512)
    row = data.dataset[0]
    tokens = tok.convert_ids_to_tokens(row["input_ids"])
    # Independently of character offsets: an answer runs from after [/INST] through the next </s>.
    in_answer, expected = False, []
    for token in tokens:
        expected.append(in_answer and token != "[/INST]")
        in_answer = token == "[/INST]" or (in_answer and token != "</s>")
    is_supervised = [label != -100 for label in row["labels"]]
    assert is_supervised == expected and sum(expected) > 4
    assert all(label in (-100, i) for i, label in zip(row["input_ids"], row["labels"]))
    assert tok.decode(supervised(row)) == "Open the tray.</s>Call support.</s>"
    markers = {tok.convert_tokens_to_ids(t) for t in ("<s>", "[INST]", "[/INST]", "[SYS]", "[/SYS]")}
    assert not markers & set(supervised(row))
    assert tokens.count("</s>") == 2 and sum(is_supervised) == data.stats.supervised_tokens
    unsupervised_text = tok.decode([i for i, s in zip(row["input_ids"], is_supervised) if not s])
    assert "My printer is jammed." in unsupervised_text and "Be brief." in unsupervised_text


def test_instruction_records_mask_like_chat(tok, tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hello there."}])
    row = tokenize_records(load_data_file(path).records, tok, max_seq_len=512).dataset[0]
    assert tok.decode(supervised(row)) == "Hello there.</s>"


def test_completion_labels_cover_completion_and_eos(tok):
    data = tokenize_records([{"prompt": "Question: what now?", "completion": " Restart it."},
                             {"prompt": "", "completion": "Plain text."}], tok, max_seq_len=512)
    first, second = data.dataset[0], data.dataset[1]
    assert tok.decode(first["input_ids"]) == "<s>Question: what now? Restart it.</s>"
    assert tok.decode(supervised(first)) == " Restart it.</s>"
    assert tok.decode(supervised(second)) == "Plain text.</s>"  # everything but the bos


def test_train_on_all_supervises_every_token_but_the_first(tok):
    data = tokenize_records([{"messages": CONVERSATION}, {"prompt": "p", "completion": "c"}], tok,
                            max_seq_len=512, train_on="all")
    for row in data.dataset:
        assert row["labels"][0] == -100 and row["labels"][1:] == row["input_ids"][1:]
    assert data.stats.supervised_tokens == data.stats.tokens - 2


def test_truncate_drop_and_unsupervised_counts(tok):
    short = {"messages": CONVERSATION[1:3]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    long_question = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    records = [short, long_answer, long_question]

    cut = tokenize_records(records, tok, max_seq_len=32, overlong="truncate")
    assert (cut.stats.rows_in, cut.stats.rows_out, cut.stats.truncated) == (3, 2, 2)
    assert cut.stats.dropped_unsupervised == 1 and cut.stats.dropped_overlong == 0
    assert cut.stats.max_len == 32 and all(len(r) <= 32 for r in cut.dataset["input_ids"])
    assert cut.stats.tokens == sum(len(r) for r in cut.dataset["input_ids"])

    dropped = tokenize_records(records, tok, max_seq_len=32, overlong="drop")
    assert (dropped.stats.rows_out, dropped.stats.dropped_overlong, dropped.stats.truncated) == (1, 2, 0)
    only = len(dropped.dataset[0]["input_ids"])
    assert dropped.stats.min_len == dropped.stats.max_len == dropped.stats.median_len == only
    assert set(dropped.stats.as_dict()) >= {"rows_in", "tokens", "supervised_tokens", "median_len"}


def test_every_row_dropped_is_an_error(tok):
    records = [{"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(DataError, match="no training rows are left") as info:
        tokenize_records(records, tok, max_seq_len=8, overlong="drop")
    assert "1 dropped as longer than max_seq_len" in info.value.message and "max_seq_len" in info.value.hint
    with pytest.raises(DataError, match="1 dropped because no answer token survived"):
        tokenize_records(records, tok, max_seq_len=8)


def test_missing_or_unstable_chat_template(tok):
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    with pytest.raises(DataError, match="no chat template") as info:
        tokenize_records([{"messages": CONVERSATION}], bare, max_seq_len=64)
    assert "data.chat_template" in info.value.hint
    # Completion rows need no template.
    assert tokenize_records([{"prompt": "a", "completion": "b"}], bare, max_seq_len=64).stats.rows_out == 1

    # A template that only prints the newest answer drops the others: an error, whatever is trained on.
    bare.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
                          "{{ m.content }}{% endif %}{% endfor %}")
    for train_on in ("completion", "all"):
        with pytest.raises(DataError, match="message 2 .assistant. is not in the text") as info:
            tokenize_records([{"messages": CONVERSATION}], bare, max_seq_len=64, train_on=train_on)
        assert "conversation 1" in info.value.message


def test_template_that_drops_system_prompts_is_an_error(tok):
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    bare.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}"
                          "[/INST]{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}"
                          "{% endfor %}")
    with pytest.raises(DataError, match=r"conversation 1 .*message 0 \(system\) is not in the text"):
        tokenize_records([{"messages": CONVERSATION}], bare, max_seq_len=64, train_on="all")


def test_template_not_prefix_stable_is_masked_turn_by_turn(tok):
    # Like Mistral's v0.3 template: the system prompt goes into the last user turn, so the whole conversation
    # does not start with the rendering of its first turn.
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    bare.chat_template = (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}"
        "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}{{ bos_token }}"
        "{% for m in messages %}{% if m.role == 'user' %}[INST]{% if m is sameas users[-1] and system %}"
        "{{ system[0] }} {% endif %}{{ m.content }}[/INST]{% elif m.role == 'assistant' %}{{ m.content }}"
        "{{ eos_token }}{% endif %}{% endfor %}")
    record = {"messages": CONVERSATION}
    row = tokenize_records([record], bare, max_seq_len=128).dataset[0]
    learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert CONVERSATION[0]["role"] == "system" and CONVERSATION[0]["content"] in tok.decode(row["input_ids"])
    assert tok.decode(learned) == "".join(m["content"] + "</s>" for m in CONVERSATION if m["role"] == "assistant")


def test_special_token_text_in_data_stays_plain(tok):
    record = {"messages": [{"role": "user", "content": "What is [INST] ?"},
                           {"role": "assistant", "content": "It ends with </s> and <s> is strikethrough."}]}
    row = tokenize_records([record], tok, max_seq_len=256).dataset[0]
    ids = row["input_ids"]
    inst = tok.convert_tokens_to_ids("[INST]")
    assert ids.count(inst) == 1 and ids.count(tok.eos_token_id) == 1 and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and row["labels"][-1] == tok.eos_token_id
    assert tok.decode(ids) == tok.apply_chat_template(record["messages"], tokenize=False)
    done = tokenize_records([{"prompt": "Q </s>", "completion": " A <s>"}], tok, max_seq_len=64).dataset[0]
    assert done["input_ids"].count(tok.eos_token_id) == 1 and done["input_ids"].count(tok.bos_token_id) == 1


def test_render_prompt_ends_where_the_answer_begins(tok):
    prompt = render_prompt(CONVERSATION[:4], tok)
    assert prompt.endswith("[INST]Still jammed.[/INST]")
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert full == prompt + "Call support.</s>"


def test_importing_data_package_stays_light():
    code = ("import sys, mistral_sov.data; heavy = [m for m in ('torch', 'transformers', 'datasets', 'pyarrow') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_sample_file_loads_and_tokenises(tok):
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".parquet"))
    assert files, "data_samples/ holds no data files"
    for path in files:
        loaded = load_data_file(path)
        assert loaded.rows > 0
        data = tokenize_records(loaded.records, tok, max_seq_len=512)
        assert data.stats.rows_out > 0 and data.stats.supervised_tokens > 0, path.name
