"""Data as people bring it: ShareGPT, OpenAI chat fine-tuning rows, and rows no reader should crash on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_sov.data import load_data_file, tokenize_records
from mistral_sov.errors import DataError


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
    return info.value.message


def supervised_text(tok, row: dict) -> str:
    return tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there."},
                              {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye."},
                              {"from": "chatgpt", "value": "Goodbye."}], "id": "a1"}


# ---- ShareGPT ----------------------------------------------------------------------------------------------

def test_sharegpt_jsonl_and_json_normalise_to_chat(tmp_path, tok):
    jsonl = load_data_file(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, SHAREGPT]))
    array = tmp_path / "s.json"
    array.write_text(json.dumps([SHAREGPT]))
    loaded = load_data_file(array)
    assert jsonl.format == loaded.format == "sharegpt" and jsonl.rows == 2
    assert [m["role"] for m in loaded.records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert loaded.records[0]["messages"][4] == {"role": "assistant", "content": "Goodbye."}
    row = tokenize_records(loaded.records, tok, max_seq_len=512).dataset[0]
    assert supervised_text(tok, row) == "Hello.</s>Goodbye.</s>"


def test_sharegpt_unknown_role_names_line_field_and_value(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, bad])
    message = problems_of(path)
    assert f"{path}:2: conversations[1].from: expected one of human, " in message and "got 'robot'" in message


def test_sharegpt_order_problems_use_the_files_field_names(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    message = problems_of(write_jsonl(tmp_path / "s.jsonl", [bad]))
    assert ":1: conversations[1].role: expected 'assistant' here" in message


def test_sharegpt_function_call_becomes_an_assistant_tool_call(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                             {"from": "observation", "value": '{"temp": 21}'},
                             {"from": "gpt", "value": "21 degrees."}],
           "tools": json.dumps([{"type": "function", "function": {"name": "weather", "parameters": {}}}])}
    record = load_data_file(write_jsonl(tmp_path / "s.jsonl", [row])).records[0]
    call = record["messages"][1]
    assert call["role"] == "assistant" and call["content"] is None
    assert call["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert record["messages"][2] == {"role": "tool", "content": '{"temp": 21}'}
    assert record["tools"][0]["function"]["name"] == "weather"


# ---- OpenAI chat fine-tuning rows --------------------------------------------------------------------------

OPENAI = {"messages": [
    {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21"},
    {"role": "assistant", "content": "Sunny, 21.", "weight": 0},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome.", "weight": 1}],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}


def test_openai_rows_keep_tools_tool_calls_and_weights(tmp_path):
    record = load_data_file(write_jsonl(tmp_path / "o.jsonl", [OPENAI])).records[0]
    messages = record["messages"]
    assert messages[0]["content"] == "Be brief."
    assert messages[2]["tool_calls"][0]["id"] == "call_1" and messages[3]["tool_call_id"] == "call_1"
    assert messages[4]["weight"] == 0 and messages[6]["weight"] == 1
    assert record["tools"] == OPENAI["tools"]


def test_weight_zero_answers_carry_no_supervised_token(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno.", "weight": 0},
                          {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos."}]}]
    records = load_data_file(write_jsonl(tmp_path / "w.jsonl", rows)).records
    row = tokenize_records(records, tok, max_seq_len=512).dataset[0]
    assert supervised_text(tok, row) == "Dos.</s>"
    assert "Uno." in tok.decode(row["input_ids"])


@pytest.mark.parametrize("message, field, words", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0]",
     "a 'image_url' part: msov trains text models only"),
    ({"role": "user", "content": [{"type": "input_audio"}]}, "messages[0].content[0]", "'input_audio' part"),
])
def test_image_and_audio_parts_are_refused(tmp_path, message, field, words):
    row = {"messages": [message, {"role": "assistant", "content": "ok"}]}
    message_text = problems_of(write_jsonl(tmp_path / "o.jsonl", [row]))
    assert f":1: {field}: " in message_text and words in message_text


@pytest.mark.parametrize("assistant, field, words", [
    ({"role": "assistant", "content": "x", "weight": 2}, "messages[1].weight", "expected 0 or 1"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
     "messages[1].tool_calls[0].function.name", "name of the function"),
    ({"role": "assistant", "content": None}, "messages[1].content", "non-empty string"),
])
def test_openai_field_rules(tmp_path, assistant, field, words):
    row = {"messages": [{"role": "user", "content": "q"}, assistant]}
    message = problems_of(write_jsonl(tmp_path / "o.jsonl", [row]))
    assert f":1: {field}: " in message and words in message


# ---- rows that used to crash the readers (issue 12, item 12) ------------------------------------------------

def test_deeply_nested_row_is_a_data_error_naming_its_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n"
                    + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert f"{path}:2: the record is nested too deeply" in problems_of(path)
    array = tmp_path / "deep.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    assert f"{array}:1: the record is nested too deeply" in problems_of(array)


def test_lone_surrogate_is_a_data_error_naming_its_line(tmp_path):
    path = tmp_path / "s.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good).replace('"b"', '"b\\ud800"') + "\n")
    assert f"{path}:2: a string holds a lone surrogate \\ud800" in problems_of(path)
    array = tmp_path / "s.json"
    array.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good).replace('"b"', '"\\udc00"') + "\n]")
    assert f"{array}:3: a string holds a lone surrogate \\udc00" in problems_of(array)


def test_cli_validate_exits_3_on_nested_and_surrogate_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok\\ud800"}\n' + '{"text": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    done = subprocess.run([sys.executable, "-m", "mistral_sov", "data", "validate", str(path), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    document = json.loads(done.stdout)
    assert "Traceback" not in done.stderr and f"{path}:1:" in json.dumps(document) and f"{path}:2:" in json.dumps(document)


# ---- preference rows, validate's report, convert ------------------------------------------------------------

PREFERENCE = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
              {"messages": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
               "rejected": [{"role": "assistant", "content": "5"}]}]


def test_preference_rows_validate_but_are_not_an_sft_format(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PREFERENCE)
    loaded = load_data_file(path, sft=False)
    assert loaded.format == "preference" and loaded.rows == 2
    assert loaded.records[1]["chosen"] == [{"role": "assistant", "content": "4"}]
    with pytest.raises(DataError) as info:
        load_data_file(path)
    assert info.value.exit_code == 3 and "not an SFT format" in info.value.message
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "chosen": [{"role": "user", "content": "x"}],
                                              "rejected": "no"}])
    assert ":1: prompt: expected a list of messages" in problems_of(bad, "preference")


def msov(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral_sov", *args], capture_output=True, text=True)


def test_convert_refuses_an_output_that_is_its_input(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    before = source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(source)
    for out in (source, tmp_path / "link.jsonl"):
        done = msov("data", "convert", str(source), "--to", "chat", "--out", str(out), "--json")
        assert done.returncode == 3 and "is the input" in json.loads(done.stdout)["error"]
    assert source.read_bytes() == before


def test_validate_says_format_rows_roles_and_fields_then_convert_writes_chat(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])
    done = msov("data", "validate", str(source))
    assert done.returncode == 0, done.stderr
    assert "format sharegpt, 1 rows, roles system/human/gpt/chatgpt; fields conversations, id" in done.stdout
    out = tmp_path / "out" / "chat.jsonl"
    done = msov("data", "convert", str(source), "--to", "chat", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 1
    converted = load_data_file(out)
    assert converted.format == "chat" and converted.records == load_data_file(source).records
    assert [p.name for p in out.parent.iterdir()] == ["chat.jsonl"]  # no temp file left behind
    text_only = write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    done = msov("data", "convert", str(text_only), "--out", str(tmp_path / "t2.jsonl"), "--json")
    assert done.returncode == 3 and "no user turn" in json.loads(done.stdout)["error"]
    assert not (tmp_path / "t2.jsonl").exists()


# ---- datasets folders, .arrow files, data_files globs --------------------------------------------------------

def test_saved_datasets_arrow_files_and_globs(tmp_path):
    import datasets

    chat = [{"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]}
            for n in range(3)]
    one = datasets.Dataset.from_list(chat)
    one.save_to_disk(str(tmp_path / "one"))
    loaded = load_data_file(tmp_path / "one")
    assert loaded.format == "chat" and loaded.records == chat and loaded.places[0] == "row 1"
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert load_data_file(arrow).records == chat
    datasets.DatasetDict({"train": one, "test": one.select([0])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="splits train, test; say which one"):
        load_data_file(tmp_path / "dict")
    assert load_data_file(tmp_path / "dict", split="test").rows == 1
    done = subprocess.run([sys.executable, "-m", "mistral_sov", "data", "validate", str(tmp_path / "dict"),
                           "--split", "train", "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["files"][0]["rows"] == 3, done.stderr

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "b.jsonl", chat[1:])
    write_jsonl(tmp_path / "data" / "a.jsonl", chat[:1])
    both = load_data_file(str(tmp_path / "data" / "*.jsonl"))
    assert both.records == chat and both.places == ["a.jsonl:1", "b.jsonl:1", "b.jsonl:2"]
    write_jsonl(tmp_path / "data" / "c.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match="different formats"):
        load_data_file(str(tmp_path / "data" / "*.jsonl"))
    with pytest.raises(DataError, match="no file matches"):
        load_data_file(str(tmp_path / "none" / "*.jsonl"))


def test_checking_a_file_holds_one_row_at_a_time(tmp_path):
    """Issue 14: validation held every row; now the Python heap peak stays flat as the file grows."""
    import tracemalloc

    row = {"messages": [{"role": "user", "content": "Printer jam? " * 20},
                        {"role": "assistant", "content": "Open the rear tray. " * 20}]}

    def peak(rows: int) -> int:
        path = write_jsonl(tmp_path / f"{rows}.jsonl", [row] * rows)
        tracemalloc.start()
        loaded = load_data_file(path, keep_records=False)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (loaded.rows, loaded.records, loaded.roles) == (rows, [], ["user", "assistant"])
        return top

    small, large = peak(200), peak(4000)  # about 0.1 MB and 2 MB of JSONL
    assert large < 1.5 * small + 100_000, (small, large)
    # Bad rows are still all reported, in file order, with line and field, after the good rows were dropped.
    path = write_jsonl(tmp_path / "bad.jsonl", [row, {"messages": []}, row, "{oops", {"msg": 1}])
    with pytest.raises(DataError) as info:
        load_data_file(path, keep_records=False)
    lines = str(info.value).splitlines()
    assert lines[0].endswith("3 problems in 3 rows (chat format, detected from line 1):")
    assert [line.split(": ")[0].rsplit(":", 1)[1] for line in lines[1:]] == ["2", "4", "5"]
