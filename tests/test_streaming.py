"""Data is streamed: `finetune`'s data stage holds no list of every record, and tokenised rows go to an Arrow file
(memory-mapped) as they are made, so its memory does not grow with the data file."""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLES, small_recipe

from mistral_sov.data import iter_records, load_data_file, tokenize_records
from mistral_sov.errors import DataError

ROW = {"messages": [{"role": "user", "content": "Printer {n} says paper jam; mail me at ann{n}@example.com"},
                    {"role": "assistant", "content": "Open the rear tray and power-cycle printer {n}."}]}


@pytest.fixture(scope="module")
def tok():
    from mistral_sov.tools.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def chat_rows(count: int) -> list[dict]:
    return [json.loads(json.dumps(ROW).replace("{n}", str(n))) for n in range(count)]


def test_prepare_inputs_keeps_no_records_and_tokens_are_on_disk(tiny_model, tmp_path, monkeypatch):
    from mistral_sov.data.scan import ScanReport, scan_rows
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import prepare_inputs, sample_conversation

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(50)))
    recipe = small_recipe(tiny_model, tmp_path / "out")
    recipe["data"]["train"].append({"path": str(data)})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    prepared = prepare_inputs(load_recipe(tmp_path / "r.yaml"))

    # Checked and counted, nothing kept: the records were read again, one at a time, into scan and tokeniser.
    assert all(f.records == [] and f.places == [] for f in prepared.train_files + prepared.eval_files)
    assert [f.rows for f in prepared.train_files] == [load_data_file(SAMPLES / "helpdesk_chat.jsonl").rows, 50]
    # Tokens live in an Arrow file under the temp folder (never the run folder or ~/.cache), memory-mapped.
    for tokens in (prepared.train, prepared.eval):
        files = [Path(f["filename"]) for f in tokens.dataset.cache_files]
        assert files and all(f.is_file() and f.is_relative_to(tmp_path / "tmp") for f in files)
    assert not (tmp_path / "out").exists()

    # The same rows, statistics and scan counts as tokenising and scanning the loaded records in memory.
    records = [r for f in (SAMPLES / "helpdesk_chat.jsonl", data) for r in load_data_file(f).records]
    expected = tokenize_records(records, prepared.tokenizer, max_seq_len=192)
    assert prepared.train.stats == expected.stats and prepared.train.stats.rows_in == len(records)
    assert prepared.train.dataset[:] == expected.dataset[:]
    report = ScanReport()
    for f in (SAMPLES / "helpdesk_chat.jsonl", data, SAMPLES / "helpdesk_chat_eval.jsonl"):
        loaded = load_data_file(f)
        scan_rows(report, str(f), zip(loaded.places, loaded.records))
    assert prepared.scan == report.summary() and prepared.scan["counts"]["email"] == 50

    first = load_data_file(SAMPLES / "helpdesk_chat_eval.jsonl").records[0]["messages"]
    assert sample_conversation(prepared.eval_files) == {"prompt": first[:-1], "reference": first[-1]["content"]}

    folder = Path(prepared.train.dataset.cache_files[0]["filename"]).parent
    del prepared, tokens, expected
    gc.collect()
    assert not folder.exists()  # removed with its dataset


def test_rows_are_written_while_records_are_read(tok, tmp_path, monkeypatch):
    """Rows reach the Arrow file batch by batch while the input is still being read: no list of them is built."""
    from mistral_sov.data import tokens

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tokens, "_BATCH", 10)
    seen = []

    def records():
        for n, row in enumerate(chat_rows(60)):
            if n == 45:
                written = list(tmp_path.glob("msov-tokens-*/tokens.arrow"))
                seen.append(written[0].stat().st_size if written else 0)
            yield row

    data = tokenize_records(records(), tok, max_seq_len=512)
    assert seen[0] > 0  # four batches of ten were on disk before the 46th record was read
    assert data.stats.rows_in == data.stats.rows_out == len(data.dataset) == 60
    assert data.dataset[:] == tokenize_records(chat_rows(60), tok, max_seq_len=512).dataset[:]
    del data
    gc.collect()
    assert not list(tmp_path.glob("msov-tokens-*"))


def test_no_rows_left_leaves_no_folder(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(DataError, match="no training rows are left after tokenising 3 records"):
        tokenize_records(iter(chat_rows(3)), tok, max_seq_len=4, overlong="drop")
    with pytest.raises(DataError, match="there are no records to tokenise"):
        tokenize_records(iter([]), tok, max_seq_len=64)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["helpdesk_chat.jsonl", "helpdesk_instruction.csv", "helpdesk_instruction.json",
                                  "helpdesk_kb.parquet", "helpdesk_completion.jsonl"])
def test_iter_records_gives_what_load_data_file_keeps(name):
    loaded = load_data_file(SAMPLES / name)
    assert list(iter_records(loaded.path, loaded.format)) == list(zip(loaded.places, loaded.records))


def test_iter_records_of_a_glob_and_a_datasetdict(tmp_path):
    import datasets

    for name, rows in (("a.jsonl", chat_rows(1)), ("b.jsonl", chat_rows(2))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    both = load_data_file(tmp_path / "*.jsonl")
    assert list(iter_records(both.path, both.format)) == list(zip(both.places, both.records))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chat_rows(2)),
                          "test": datasets.Dataset.from_list(chat_rows(1))}).save_to_disk(tmp_path / "dd")
    test = load_data_file(tmp_path / "dd", split="test")
    assert test.split == "test"
    assert list(iter_records(test.path, test.format, test.split)) == list(zip(test.places, test.records))


def test_a_file_changed_after_its_check_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(2)))
    loaded = load_data_file(path, keep_records=False)
    path.write_text(json.dumps(chat_rows(1)[0]) + '\n{"messages": []}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: messages: .*changed meanwhile"):
        list(iter_records(loaded.path, loaded.format))


def test_a_killed_writers_token_folder_is_removed_by_the_next_run(tok, tmp_path, monkeypatch):
    """kill -9 while tokenising leaves msov-tokens-<pid>-*; the next tokenisation removes it once that pid is gone
    (a live process's folder is left alone)."""
    import subprocess

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f"msov-tokens-{dead.pid}-abc", tmp_path / f"msov-tokens-{os.getppid()}-abc"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "tokens.arrow").write_bytes(b"partial")
    tokenize_records([{"prompt": "a", "completion": "b"}], tok, max_seq_len=16)
    assert not stale.exists() and live.exists()
