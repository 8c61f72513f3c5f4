"""Hostile or careless model folders and recipes: each is exit 3 naming the file and field, never a traceback,
and `msov plan` never allocates what a config.json asks for (it runs under an address-space limit here)."""

import json
import resource
import subprocess
import sys

import pytest
from conftest import REPO, small_recipe

SHAPES = REPO / "tests" / "shapes" / "mistral-7b-v0.1"
AS_LIMIT = 4 * 1024**3


def config_only_model(folder, **changes):
    folder.mkdir()
    config = json.loads((SHAPES / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def test_plan_stays_on_meta_under_a_memory_limit(tmp_path, write_recipe):
    # Before: LoRA's layers were built on the CPU outside the meta device; hidden_size 1e9 asked for 64 GB
    # (exit 1 under this limit, 15 GB and growing without it). hidden_size 2**20 keeps the config valid but
    # would still need about 30 GB of real LoRA weights.
    wide = small_recipe(config_only_model(tmp_path / "wide", hidden_size=2**20, max_position_embeddings=2**30),
                        tmp_path / "out")
    absurd = small_recipe(config_only_model(tmp_path / "absurd", hidden_size=1e9), tmp_path / "out2")
    script = f"""
import json, sys
from typer.testing import CliRunner
from mistral_sov.cli import app
for recipe in sys.argv[1:]:
    result = CliRunner().invoke(app, ["plan", recipe, "--gpu-mem", "80GB", "--json"])
    print(json.dumps({{"exit": result.exit_code, "out": json.loads(result.stdout)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(write_recipe(wide, "wide.yaml")),
                           str(write_recipe(absurd, "absurd.yaml"))], capture_output=True, text=True,
                          preexec_fn=_limit_memory, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wide_run, absurd_run = (json.loads(line) for line in proc.stdout.splitlines())
    assert wide_run["exit"] == 3 and wide_run["out"]["verdict"] == "does not fit"
    assert wide_run["out"]["model"]["hidden"] == 2**20
    assert absurd_run["exit"] == 3
    assert absurd_run["out"]["error"].startswith(str(tmp_path / "absurd" / "config.json"))
    assert "hidden_size: expected a whole number from 1 to 1048576, got 1000000000.0" in absurd_run["out"]["error"]


@pytest.mark.parametrize("changes, expected", [
    ({"model_type": "no-such-arch"}, "model_type: 'no-such-arch' is not an architecture transformers"),
    ({"num_hidden_layers": -1}, "num_hidden_layers: expected a whole number from 1 to 1024, got -1"),
    ({"vocab_size": "32000"}, "vocab_size: expected a whole number from 1 to 16777216, got '32000'"),
    ({"num_key_value_heads": 5}, "num_key_value_heads: 5 does not divide num_attention_heads 32"),
    ({"hidden_size": 4100}, "hidden_size: 4100 is not a multiple of num_attention_heads 32"),
], ids=["unknown-model-type", "negative", "string", "gqa", "indivisible"])
def test_bad_config_is_exit_3_naming_file_and_field(cli, write_recipe, tmp_path, changes, expected):
    # Before: an unknown model_type was transformers' ValueError, exit 1; the sizes reached torch.
    model = config_only_model(tmp_path / "model", **changes)
    result = cli("plan", write_recipe(small_recipe(model, tmp_path / "out")), "--json")
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error.startswith(f"{model / 'config.json'}: ") and expected in error


@pytest.mark.parametrize("damage", ["truncated", "header-length", "header-json"])
def test_malformed_safetensors_is_exit_3_naming_the_file(cli, write_recipe, model_copy, tmp_path, damage):
    # Before: --dry-run passed and training died inside safetensors (SafetensorError, exit 1).
    weights = next(model_copy.glob("*.safetensors"))
    data = weights.read_bytes()
    header = int.from_bytes(data[:8], "little")
    data = {"truncated": data[:-64], "header-length": (10**12).to_bytes(8, "little") + data[8:],
            "header-json": data[:8] + b"[" + data[9:8 + header] + data[8 + header:]}[damage]
    weights.write_bytes(data)
    result = cli("finetune", write_recipe(small_recipe(model_copy, tmp_path / "out")), "--dry-run", "--json")
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout)["error"].startswith(f"{weights}: not a readable safetensors file")


def test_model_path_missing_or_a_file_is_exit_3_and_a_hub_id_exit_5(cli, write_recipe, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.safetensors").write_bytes(b"x")
    cases = {"models/missing": (3, "does not exist"), "./gone": (3, "does not exist"), "gone": (3, "does not exist"),
             str(tmp_path / "models" / "weights.safetensors"): (3, "is a file"),
             "models/weights.safetensors": (3, "is a file"),
             "mistralai/Mistral-7B-v0.1": (5, "looks like a hub id")}
    for path, (code, words) in cases.items():
        recipe = small_recipe(tmp_path, tmp_path / "out")
        recipe["model"]["path"] = path
        result = cli("plan", write_recipe(recipe), "--json")
        assert result.exit_code == code, (path, result.output)
        assert words in json.loads(result.stdout)["error"], path
