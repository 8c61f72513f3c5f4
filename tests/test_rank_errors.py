"""An error on one rank stops every rank, with one message (torchrun, 2 processes, gloo on CPU)."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import free_port, small_recipe, torchrun

from mistral_sov.errors import InputError
from mistral_sov.train.ranks import StoppedWithPeers, all_ranks_agree, is_peer_failure

# Rank 0 and the other ranks may get different recipes: a multi-node run where one node cannot read the data.
PER_RANK = """
import os, sys
from mistral_sov.cli import app
recipe = sys.argv[1] if os.environ["RANK"] == "0" else sys.argv[2]
app(["finetune", recipe])
"""

# A failure inside training on rank 1 only, after the ranks agreed the inputs were fine.
FAIL_IN_TRAINING = """
import os, sys
import mistral_sov.train.trainer as training
from transformers import TrainerCallback

class FailOnRankOne(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and os.environ["RANK"] == "1":
            raise RuntimeError("simulated failure on one rank")

original = training.trainer_callbacks
training.trainer_callbacks = lambda *a, **k: original(*a, **k) + [FailOnRankOne()]
from mistral_sov.cli import app
app(["finetune", sys.argv[1]])
"""


def two_ranks(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([torchrun(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), str(script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def msov_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_one_process_runs_the_check_as_is(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert all_ranks_agree(lambda: 42) == 42
    with pytest.raises(InputError, match="bad"):
        all_ranks_agree(lambda: (_ for _ in ()).throw(InputError("bad")))


def test_peer_failures_are_recognised_only_in_multi_process_runs(monkeypatch):
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:44459")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert is_peer_failure(gone) and not is_peer_failure(RuntimeError("CUDA out of memory"))
    assert not is_peer_failure(RuntimeError("NCCL error in ProcessGroupNCCL.cpp: unhandled system error"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not is_peer_failure(gone)


def test_any_exception_in_the_checks_stops_all_ranks(monkeypatch):
    # A PermissionError on one node is not an MsovError; it must still reach the agreement, not skip it.
    gathered = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("mistral_sov.train.ranks.all_gather", lambda value: gathered.append(value) or [value, value])
    with pytest.raises(Exception, match="unexpected PermissionError: denied") as err:
        all_ranks_agree(lambda: (_ for _ in ()).throw(PermissionError("denied")))
    assert err.value.exit_code == 1 and gathered[0]["failure"]["rank"] == 0


def test_ranks_that_found_different_inputs_stop(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    other = {"recipe": "a", "checkpoint": None}
    monkeypatch.setattr("mistral_sov.train.ranks.all_gather", lambda value: [value, {"failure": None, "fingerprint": other}])
    assert all_ranks_agree(lambda: "ok", fingerprint=lambda _: {"recipe": "a", "checkpoint": None}) == "ok"
    with pytest.raises(Exception) as err:
        all_ranks_agree(lambda: "ok", fingerprint=lambda _: {"recipe": "a", "checkpoint": "checkpoint-50"})
    assert err.value.message == ("rank 1 of 2: found different inputs than rank 0: "
                                 "checkpoint: None, rank 0: 'checkpoint-50'")
    assert err.value.exit_code == 3
    monkeypatch.setenv("RANK", "1")  # the other ranks stop silently with the same code
    with pytest.raises(StoppedWithPeers) as quiet:
        all_ranks_agree(lambda: "ok", fingerprint=lambda _: {"recipe": "a", "checkpoint": "checkpoint-50"})
    assert quiet.value.exit_code == 3


def test_bad_input_on_every_rank_is_reported_once(tiny_model, tmp_path):
    bad = small_recipe(tiny_model, tmp_path / "out")
    bad["data"]["train"][0]["path"] = str(tmp_path / "missing.jsonl")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "run.py").write_text(PER_RANK)
    done = two_ranks(tmp_path / "run.py", str(tmp_path / "bad.yaml"), str(tmp_path / "bad.yaml"))
    assert done.returncode != 0
    assert msov_errors(done.stderr) == [f"error: {tmp_path / 'missing.jsonl'}: no such data file"], done.stderr
    assert "msov: " in done.stderr  # torchrun's failure summary carries our message, not "<N/A>"
    assert not list(tmp_path.glob("out*"))


def test_bad_input_on_one_rank_stops_both_and_names_the_rank(tiny_model, tmp_path):
    good = small_recipe(tiny_model, tmp_path / "out", max_steps=2)
    bad = {**good, "data": {**good["data"], "train": [{"path": str(tmp_path / "missing.jsonl"), "format": "chat"}]}}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "run.py").write_text(PER_RANK)
    done = two_ranks(tmp_path / "run.py", str(tmp_path / "good.yaml"), str(tmp_path / "bad.yaml"))
    assert done.returncode != 0
    errors = msov_errors(done.stderr)
    assert errors == [f"error: rank 1 of 2: {tmp_path / 'missing.jsonl'}: no such data file"], done.stderr
    assert not list(tmp_path.glob("out*"))  # rank 0 stopped before creating anything


def test_failure_during_training_on_one_rank_stops_all_with_one_message(tiny_model, tmp_path):
    recipe = small_recipe(tiny_model, tmp_path / "out", max_steps=50, batch_size=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "run.py").write_text(FAIL_IN_TRAINING)
    done = two_ranks(tmp_path / "run.py", str(tmp_path / "r.yaml"))
    assert done.returncode != 0
    errors = msov_errors(done.stderr)
    assert errors == ["error: rank 1 of 2: unexpected RuntimeError: simulated failure on one rank"], done.stderr
    assert not (tmp_path / "out").exists()  # nothing published; the unfinished run can be resumed
