"""The CLI as users and CI meet it: exit codes, one-paragraph errors, --json, --dry-run."""

import json
import subprocess
import sys

import pytest
from conftest import SAMPLES, small_recipe


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys\n"
        "from mistral_sov.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "finetune" in done.stdout


def test_hub_id_is_refused_with_exit_5_before_any_network(cli, write_recipe, tmp_path):
    recipe = small_recipe(tmp_path / "unused", tmp_path / "out")
    recipe["model"]["path"] = "mistralai/Mistral-7B-v0.1"
    result = cli("finetune", write_recipe(recipe))
    assert result.exit_code == 5, result.output
    assert "'mistralai/Mistral-7B-v0.1' is not a local folder" in result.stderr
    assert "msov never downloads" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_local_folder_is_exit_3(cli, write_recipe, tmp_path):
    # A local path the user mistyped is bad input (3); only a hub id is an environment refusal (5).
    recipe = small_recipe(tmp_path / "no-such-model", tmp_path / "out")
    result = cli("finetune", write_recipe(recipe), "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["exit_code"] == 3
    assert "does not exist" in json.loads(result.stdout)["error"]


def test_recipe_error_is_exit_3_with_suggestion(cli, write_recipe, tiny_model, tmp_path):
    recipe = small_recipe(tiny_model, tmp_path / "out")
    recipe["lora"]["alpah"] = 3
    result = cli("finetune", write_recipe(recipe))
    assert result.exit_code == 3
    assert "lora.alpah: unknown key; did you mean 'alpha'?" in result.stderr


def test_pickle_weights_refused(cli, write_recipe, model_copy, tmp_path):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    result = cli("finetune", write_recipe(small_recipe(model_copy, tmp_path / "out")), "--dry-run")
    assert result.exit_code == 3
    assert "msov loads safetensors only" in result.stderr and "pytorch_model.bin" in result.stderr


def test_bad_data_is_exit_3_with_file_and_line(cli, write_recipe, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good_line = (SAMPLES / "helpdesk_chat.jsonl").read_text().splitlines()[0]
    bad.write_text(good_line + "\n" + '{"messages": [{"role": "bot", "content": "hi"}]}\n')
    recipe = small_recipe(tiny_model, tmp_path / "out")
    recipe["data"]["train"] = [{"path": str(bad), "format": "chat"}]
    result = cli("finetune", write_recipe(recipe))
    assert result.exit_code == 3
    assert f"{bad}:2: messages[0].role" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_and_trains_nothing(cli, write_recipe, tiny_model, tmp_path):
    path = write_recipe(small_recipe(tiny_model, tmp_path / "out"))
    result = cli("finetune", path, "--dry-run", "--json", "--set", "lora.r=4")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "dry-run" and report["recipe"]["lora"]["r"] == 4
    assert 0 < report["parameters"]["trainable"] < report["parameters"]["total"]
    assert report["tokens"]["train"]["supervised_tokens"] > 0
    assert report["data"]["train"][0]["rows"] > 100
    human = cli("finetune", path, "--dry-run")
    assert human.exit_code == 0
    assert "trainable of" in human.stdout and "dry run ok" in human.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_data_validate_command(cli, tmp_path):
    ok = cli("data", "validate", SAMPLES / "helpdesk_chat.jsonl", SAMPLES / "helpdesk_instruction.csv")
    assert ok.exit_code == 0 and "rows" in ok.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("instruction,input,output\nReset my password,,\n")
    result = cli("data", "validate", bad, "--format", "instruction")
    assert result.exit_code == 3
    assert f"{bad}:2: output" in result.stderr


def test_demo_end_to_end(tmp_path):
    """What `make demo` runs: tiny model from the bundled samples, LoRA, before/after, outputs in place. In a
    process of its own: libraries that print at import (DeepSpeed) write to the real stdout."""
    result = subprocess.run([sys.executable, "-m", "mistral_sov", "demo", "--out", str(tmp_path / "demo"), "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)  # the whole of stdout is one document
    assert "Setting accelerator" not in result.stdout + result.stderr  # a CPU run does not probe for accelerators
    assert summary["eval"]["after"]["loss"] < 0.6 * summary["eval"]["before"]["loss"]
    assert summary["sample"]["before"] != summary["sample"]["after"]
    assert (tmp_path / "demo" / "tiny-model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["demo_wall_time_s"] > 0


@pytest.mark.parametrize("args, code", [
    (["version", "--json"], 0),
    (["finetune", "missing.yaml", "--json"], 3),
    (["finetune", "--json"], 2),  # usage: missing argument
    (["version", "--jsn", "--json"], 2),  # usage: unknown option
    (["data", "no-such-command", "--json"], 2),
])
def test_json_stdout_is_exactly_one_document_on_success_and_on_every_error(cli, args, code):
    result = cli(*args)
    assert result.exit_code == code, result.output
    document = json.loads(result.stdout)
    assert (document.get("status") == "error") == (code != 0)
    if code:
        assert document["exit_code"] == code and document["error"]
