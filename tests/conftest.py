"""Shared fixtures: one tiny model per session, recipes written around it, a CLI runner."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

from mistral_sov.guard.env import enforce_offline_env

enforce_offline_env()  # before any test imports transformers, as msov itself does

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data_samples"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Built once (seconds); tests that modify a model copy it first (see `model_copy`)."""
    from mistral_sov.tools.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    return target


def small_recipe(model: Path, out: Path, **train) -> dict:
    """A fast recipe on the tiny model: chat train data and the held-out eval file."""
    return {
        "name": "test-run",
        "model": {"path": str(model)},
        "data": {
            "train": [{"path": str(SAMPLES / "helpdesk_chat.jsonl"), "format": "chat"}],
            "eval": [{"path": str(SAMPLES / "helpdesk_chat_eval.jsonl"), "format": "chat"}],
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"epochs": 1, "lr": 5e-3, "batch_size": 8, "max_seq_len": 192, "seed": 7,
                  "logging_steps": 2, "save_steps": 5, **train},
        "output": {"dir": str(out)},
    }


@pytest.fixture
def write_recipe(tmp_path):
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli():
    """Invoke the real Typer app in-process; returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from mistral_sov.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def torchrun() -> str:
    """torchrun beside this Python (multi-process tests run on CPU with gloo)."""
    path = Path(sys.executable).with_name("torchrun")
    if not path.exists():
        pytest.skip("torchrun is not installed beside this Python")
    return str(path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RUN_DRIVER = """
import json, os, sys
from mistral_sov.train.pipeline import finetune
from mistral_sov.recipe import load_recipe
summary = finetune(load_recipe(sys.argv[1]))
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(summary.to_json(), f)
"""


def two_ranks_then_one(tmp_path: Path, ddp_recipe: Path, one_recipe: Path) -> tuple[dict, dict]:
    """`ddp_recipe` trained by 2 ranks (torchrun, gloo), then `one_recipe` by one process: (rank 0's run record,
    the single process's), after checking both ranks ended with the same adapter."""
    import json
    import os
    import subprocess

    launcher = torchrun()
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    driver = tmp_path / "run_driver.py"
    driver.write_text(RUN_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([launcher, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), str(driver), str(ddp_recipe), str(reports)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((reports / "rank0.json").read_text())
    rank1 = json.loads((reports / "rank1.json").read_text())
    assert rank1["trainable_sha256"] == rank0["parameters"]["trainable_sha256"]  # same adapter on both ranks
    single = subprocess.run([sys.executable, str(driver), str(one_recipe), str(reports)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    return rank0, json.loads((reports / "rank0.json").read_text())
