"""Crashes lose nothing: kill -9 then --resume gives the uninterrupted adapter; Ctrl-C checkpoints and exits 130."""

import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import small_recipe
from mistral_sov.errors import Interrupted
from mistral_sov.finetune import finetune
from mistral_sov.manifest import sha256_file
from mistral_sov.recipe import load_recipe

STEPS = dict(max_steps=12, save_steps=4, logging_steps=1)


def recipe_at(tiny_model, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tiny_model, tmp_path / name, **STEPS)))
    return path


@pytest.fixture(scope="module")
def uninterrupted_digest(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    finetune(load_recipe(recipe_at(tiny_model, tmp, "straight")))
    return sha256_file(tmp / "straight" / "adapter" / "adapter_model.safetensors")


def test_kill_9_then_resume_gives_the_same_adapter(tiny_model, tmp_path, uninterrupted_digest, cli):
    path = recipe_at(tiny_model, tmp_path, "killed")
    driver = (
        "import os, signal\n"
        "from mistral_sov.finetune import finetune\n"
        "from mistral_sov.recipe import load_recipe\n"
        "def on_event(kind, payload):\n"
        "    if kind == 'step' and payload['step'] == 7:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"finetune(load_recipe({str(path)!r}), on_event=on_event)\n"
    )
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-1000:]
    assert not (tmp_path / "killed").exists()
    assert (tmp_path / "killed.partial" / "checkpoints" / "checkpoint-4").is_dir()

    result = cli("finetune", path, "--resume", "--json")
    assert result.exit_code == 0, result.output
    digest = sha256_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert digest == uninterrupted_digest


def test_ctrl_c_checkpoints_and_exits_130(tiny_model, tmp_path, uninterrupted_digest, cli):
    path = recipe_at(tiny_model, tmp_path, "stopped")

    def press_ctrl_c(kind, payload):
        if kind == "step" and payload["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as err:
        finetune(load_recipe(path), on_event=press_ctrl_c)
    assert err.value.exit_code == 130 and "interrupted at step 6" in err.value.message
    assert (tmp_path / "stopped.partial" / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()
    assert not (tmp_path / "stopped").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    result = cli("finetune", path, "--resume")
    assert result.exit_code == 0, result.output
    assert sha256_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors") == uninterrupted_digest


def test_unwritable_output_is_a_clear_error(cli, write_recipe, tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli("finetune", write_recipe(small_recipe(tiny_model, blocker / "out")))
    assert result.exit_code == 3
    assert "output.dir: cannot create" in result.stderr and "Traceback" not in result.stderr
