"""Preference tuning under the sharding engines: DPO with FSDP2 and with DeepSpeed ZeRO-3 (2 ranks, gloo, CPU) learns
as one process does. The reference pass is the hard part there: the adapter is switched off inside a model whose
parameters are sharded (FSDP2's DTensors, ZeRO-3's partitions), under no_grad, between two gathered forwards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port, small_recipe
from test_distributed import FORCE_FSDP_ON_CPU, REPO
from test_preference import preference_rows, write_jsonl

from mistral_sov.recipe import load_recipe
from mistral_sov.train.pipeline import finetune


def launch(engine: str, tmp_path: Path, recipe: Path) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    if engine == "fsdp":
        cli_main = "from mistral_sov.cli import app\napp(prog_name='msov')\n"
        (tmp_path / "driver.py").write_text(FORCE_FSDP_ON_CPU + cli_main)
        config, program = REPO / "recipes/accelerate/fsdp.yaml", [str(tmp_path / "driver.py")]
    else:
        pytest.importorskip("deepspeed")
        config, program = REPO / "recipes/accelerate/deepspeed-zero3.yaml", ["-m", "mistral_sov"]
    return subprocess.run([str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2",
                           "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
                           "--main_process_port", str(free_port()), *program, "finetune", str(recipe)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_dpo_under_a_sharding_engine_learns_as_one_process(engine, tiny_model, tmp_path):
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", preference_rows(48, 8))),
             "eval": str(write_jsonl(tmp_path / "eval.jsonl", preference_rows(16, 9)))}
    for name, batch in (("sharded", 4), ("one", 8)):  # global batch 8 either way
        data = small_recipe(tiny_model, tmp_path / "runs" / name, max_steps=6, batch_size=batch, method="dpo")
        data["data"] = files
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    done = launch(engine, tmp_path, tmp_path / "sharded.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads((tmp_path / "runs" / "sharded" / "run.json").read_text())
    assert sharded["train"]["processes"] == 2
    if engine == "fsdp":
        assert sharded["train"]["fsdp"] is True  # really sharded by FSDP2, not DDP
    one = finetune(load_recipe(tmp_path / "one.yaml"))
    assert sharded["eval"]["before"]["reward_margin"] == 0.0  # the reference is the policy with the adapter off
    assert sharded["train"]["final_loss"] == pytest.approx(one.train.final_loss, rel=1e-3, abs=1e-5)
    assert sharded["eval"]["after"]["reward_margin"] == pytest.approx(one.eval.after.reward_margin, rel=1e-3)
    assert sharded["eval"]["after"]["reward_margin"] != 0.0  # it learned something
