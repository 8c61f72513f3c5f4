"""Outputs never delete inputs or folders msov did not write; one run per folder; --resume refuses changed inputs."""

import os
import shutil
import signal

import pytest
import yaml
from conftest import SAMPLES, small_recipe

from mistral_sov.errors import InputError, Interrupted
from mistral_sov.export.stage import check_target
from mistral_sov.guard.paths import refuse_foreign, refuse_overlap
from mistral_sov.recipe import load_recipe
from mistral_sov.train.pipeline import finetune
from mistral_sov.train.run_folder import run_lock
from mistral_sov.trust.hashing import digest_folder, sha256_file


@pytest.mark.parametrize("where", ["model", "model/inner", "above-model"])
def test_output_overlapping_the_model_is_refused_even_with_overwrite(model_copy, tmp_path, write_recipe, cli, where):
    before = digest_folder(model_copy)
    out = {"model": model_copy, "model/inner": model_copy / "inner", "above-model": tmp_path}[where]
    result = cli("finetune", write_recipe(small_recipe(model_copy, out)), "--overwrite")
    assert result.exit_code == 3, result.output
    assert "output.dir" in result.stderr and str(model_copy) in result.stderr.replace("\n", "")
    assert digest_folder(model_copy) == before


def test_output_containing_a_data_file_is_refused(tiny_model, tmp_path, write_recipe, cli):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLES / "helpdesk_chat.jsonl", data / "train.jsonl")
    recipe = small_recipe(tiny_model, data)
    recipe["data"]["train"][0]["path"] = str(data / "train.jsonl")
    result = cli("finetune", write_recipe(recipe), "--overwrite")
    assert result.exit_code == 3 and "contains the input" in result.stderr.replace("\n", " ")
    assert (data / "train.jsonl").is_file()


def test_demo_never_deletes_a_folder_msov_did_not_write(tmp_path, cli):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    result = cli("demo", "--out", tmp_path)
    assert result.exit_code == 3, result.output
    assert "was not written by msov" in result.stderr.replace("\n", " ")
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_export_targets_overlapping_inputs_or_foreign_folders_are_refused(tmp_path, model_copy):
    with pytest.raises(InputError, match="is the input"):
        refuse_overlap(model_copy, [tmp_path / "run", model_copy], what="--out")
    with pytest.raises(InputError, match="contains the input"):
        refuse_overlap(tmp_path, [model_copy], what="--out")
    with pytest.raises(InputError, match="not written by msov"):  # export --merge --out BASE --overwrite
        check_target(model_copy, overwrite=True)
    published = tmp_path / "export"
    (published / "msov").mkdir(parents=True)
    (published / "msov" / "provenance.json").write_text("{}")
    check_target(published, overwrite=True)  # msov's own export may be replaced
    refuse_foreign(tmp_path / "absent", what="--out")


def test_a_second_run_into_a_locked_folder_is_refused_and_a_stale_lock_is_not(tiny_model, tmp_path, write_recipe,
                                                                               cli):
    out = tmp_path / "run"
    path = write_recipe(small_recipe(tiny_model, out))
    with run_lock(out):
        result = cli("finetune", path, "--json")
        assert result.exit_code == 3
        assert f"pid {os.getpid()}" in result.stdout + result.stderr
    (tmp_path / "run.lock").write_text("99999999\n")  # what a killed run leaves: content, no flock
    with run_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()  # the holder removes it as it lets go: nothing is left beside the output


def test_resume_refuses_changed_inputs_skips_torn_checkpoints_and_sigterm_exits_143(tiny_model, tmp_path, cli):
    data = tmp_path / "train.jsonl"
    shutil.copy(SAMPLES / "helpdesk_chat.jsonl", data)
    recipe = small_recipe(tiny_model, tmp_path / "run", max_steps=8, save_steps=3, logging_steps=1)
    recipe["data"]["train"][0]["path"] = str(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def send_sigterm(kind, payload):
        if kind == "step" and payload["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as err:
        finetune(load_recipe(path), on_event=send_sigterm)
    assert err.value.exit_code == 143
    work = tmp_path / "run.partial"
    assert (work / "checkpoints" / "checkpoint-4" / "msov-complete").is_file()

    original = data.read_bytes()
    data.write_bytes(original.replace(b"password", b"passphrase", 1))
    result = cli("finetune", path, "--resume", "--json")
    assert result.exit_code == 3, result.output
    message = result.stdout.replace("\n", " ")
    assert "train.jsonl" in message and sha256_file(data) in message
    data.write_bytes(original)

    result = cli("finetune", path, "--resume", "--set", "quantization.bits=4", "--json")
    assert result.exit_code == 3 and "quantization" in result.stdout, result.output

    # a kill mid-save and mid-log: a checkpoint with an empty state and a truncated weights file, a torn line
    torn = work / "checkpoints" / "checkpoint-7"
    shutil.copytree(work / "checkpoints" / "checkpoint-4", torn)
    (torn / "trainer_state.json").write_text("")
    weights = torn / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with open(work / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')
    result = cli("finetune", path, "--resume")
    assert result.exit_code == 0, result.output
    assert "skipped checkpoint-7" in result.stderr.replace("\n", " ")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(yaml.safe_load(line) for line in lines)


def test_resume_switching_on_a_null_section_is_refused_not_a_traceback(tmp_path):
    from mistral_sov.recipe import Recipe
    from mistral_sov.train.run_folder import check_same_recipe

    recipe = small_recipe(tmp_path / "model", tmp_path / "out")
    (tmp_path / "recipe.yaml").write_text(Recipe.model_validate(recipe).to_yaml())  # quantization: null
    with pytest.raises(InputError, match=r"differs .*quantization\.bits"):
        check_same_recipe(Recipe.model_validate({**recipe, "quantization": {"bits": 4}}), tmp_path / "recipe.yaml")
    with pytest.raises(InputError, match=r"differs .*quantization\.bits"):  # and switching it off again
        saved = Recipe.model_validate({**recipe, "quantization": {"bits": 4}})
        (tmp_path / "recipe.yaml").write_text(saved.to_yaml())
        check_same_recipe(Recipe.model_validate(recipe), tmp_path / "recipe.yaml")
