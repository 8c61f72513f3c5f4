"""Two processes (torchrun, gloo, CPU) train like one: same adapter on both ranks, one output folder, same loss."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import small_recipe

DRIVER = """
import json, os, sys
from mistral_sov.finetune import finetune
from mistral_sov.recipe import load_recipe
summary = finetune(load_recipe(sys.argv[1]))
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(summary, f)
"""


def torchrun() -> str:
    path = Path(sys.executable).with_name("torchrun")
    if not path.exists():
        pytest.skip("torchrun is not installed beside this Python")
    return str(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_match_one_process(tiny_model, tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    # Global batch 8 either way: 2 ranks x 4, or 1 process x 8.
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "runs" / "ddp", max_steps=12, batch_size=4, save_steps=5)))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "runs" / "one", max_steps=12, batch_size=8, save_steps=5)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()),
                           str(tmp_path / "driver.py"), str(tmp_path / "ddp.yaml"), str(reports)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((reports / "rank0.json").read_text())
    rank1 = json.loads((reports / "rank1.json").read_text())
    assert rank1["trainable_sha256"] == rank0["parameters"]["trainable_sha256"]  # same adapter on both ranks
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]  # one output folder, no partials
    assert rank0["train"]["steps"] == 12

    single = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "one.yaml"), str(reports)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((reports / "rank0.json").read_text())
    assert rank0["eval"]["after"]["loss"] == pytest.approx(one["eval"]["after"]["loss"], rel=1e-3)
    assert rank0["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-3)
