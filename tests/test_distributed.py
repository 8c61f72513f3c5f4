"""Two processes (torchrun, gloo, CPU) train like one: same adapter on both ranks, one output folder, same loss.

FSDP too, launched by `accelerate launch --config_file recipes/accelerate/fsdp.yaml`. On CPU accelerate 1.15 never
turns FSDP on (a CPU launch stays MULTI_CPU and trains as DDP; msov warns), but torch's FSDP2 runs with gloo: the
FSDP driver below makes accelerate take its FSDP2 path anyway, as it would on GPUs, so that msov's handling of a
sharded model (gathering the adapter, evaluating and generating through the shards) runs for real here.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import small_recipe
from mistral_sov.finetune import finetune
from mistral_sov.recipe import load_recipe

DRIVER = """
import json, os, sys
from mistral_sov.finetune import finetune
from mistral_sov.recipe import load_recipe
summary = finetune(load_recipe(sys.argv[1]))
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(summary, f)
"""

# accelerate/state.py promotes only GPU-like distributed types to FSDP; do the same for MULTI_CPU (test only).
FORCE_FSDP_ON_CPU = """
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
_init = AcceleratorState.__init__
def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, kwargs["fsdp_plugin"]
AcceleratorState.__init__ = _init_fsdp_on_cpu
"""
REPO = Path(__file__).resolve().parent.parent


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


def accelerate_fsdp(tmp_path, recipe: dict, reports: Path) -> subprocess.CompletedProcess:
    """Two ranks under accelerate launch with the shipped FSDP config, FSDP2 forced on (see FORCE_FSDP_ON_CPU).
    The config's bf16 autocast is turned off so the fp32 recipe decides, as it does in one process."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    (tmp_path / "fsdp_driver.py").write_text(FORCE_FSDP_ON_CPU + DRIVER)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(recipe))
    reports.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/fsdp.yaml"),
                           "--num_processes", "2", "--mixed_precision", "no",
                           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
                           str(tmp_path / "fsdp_driver.py"), str(tmp_path / "fsdp.yaml"), str(reports)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_fsdp_two_ranks_save_the_whole_adapter_and_match_one_process(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mistral_sov.distributed import trained_tensors
    from mistral_sov.evaluate import evaluation_loss
    from mistral_sov.finetune import _trainable_digest, prepare_inputs
    from mistral_sov.recipe import Recipe
    from mistral_sov.training import make_collator

    reports = tmp_path / "reports"
    # Global batch 8 either way: 2 ranks x 4, or 1 process x 8.
    done = accelerate_fsdp(tmp_path, small_recipe(tiny_model, tmp_path / "runs" / "fsdp", max_steps=12,
                                                  batch_size=4, save_steps=5), reports)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((reports / "rank0.json").read_text())
    rank1 = json.loads((reports / "rank1.json").read_text())
    assert rank0["train"]["fsdp"] is True and rank0["train"]["processes"] == 2  # really sharded, by FSDP2
    assert rank1["trainable_sha256"] == rank0["parameters"]["trainable_sha256"]  # both gathered the same adapter
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["fsdp"]  # one output folder, no partials
    assert rank0["train"]["steps"] == 12

    # The saved adapter is the whole adapter in plain PEFT format: PEFT alone loads it, its tensors are the ones
    # every rank gathered, and it scores the held-out data as the sharded model did at the end of the run.
    adapter = Path(rank0["adapter_dir"])
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                      adapter, is_trainable=True)
    assert _trainable_digest(trained_tensors(tuned)) == rank0["parameters"]["trainable_sha256"]
    prepared = prepare_inputs(Recipe.model_validate(yaml.safe_load((tmp_path / "fsdp.yaml").read_text())))
    reloaded = evaluation_loss(tuned, prepared.eval.dataset, make_collator(prepared.tokenizer), batch_size=4)
    assert reloaded["loss"] == pytest.approx(rank0["eval"]["after"]["loss"], rel=1e-6)

    # Against one process with the same global batch. Measured on this CPU (torch 2.13, gloo): the logged train
    # loss is bit-identical and the held-out loss differs by 8e-9 relative (the adapter by at most 8.5e-7): FSDP
    # only reorders float sums. 1e-5 leaves 1000x room for another CPU's kernels and still fails on any real
    # divergence: a wrong gradient average or a rank missing its data moves these losses by 1e-2 or more.
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "one" / "run", max_steps=12, batch_size=8, save_steps=5)))
    single = subprocess.run([sys.executable, str(tmp_path / "fsdp_driver.py"), str(tmp_path / "one.yaml"),
                             str(tmp_path / "one")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert one["train"]["fsdp"] is False
    assert rank0["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-5)
    assert rank0["eval"]["after"]["loss"] == pytest.approx(one["eval"]["after"]["loss"], rel=1e-5)


@pytest.fixture
def fsdp_env(monkeypatch):
    """The environment `accelerate launch --config_file recipes/accelerate/fsdp.yaml` gives every rank."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")


def test_fsdp_refuses_8bit_qlora_before_loading_weights(tiny_model, tmp_path, write_recipe, cli, fsdp_env,
                                                         monkeypatch):
    pytest.importorskip("bitsandbytes")
    import mistral_sov.modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(mistral_sov.modeling, "load_model", no_loading)
    recipe = small_recipe(tiny_model, tmp_path / "out", max_steps=2)
    recipe["quantization"] = {"bits": 8, "compute_dtype": "float32"}
    result = cli("finetune", write_recipe(recipe))
    assert result.exit_code == 3, result.output
    assert "quantization.bits: 8-bit weights cannot be sharded by FSDP" in result.stderr
    assert "4-bit" in result.stderr and "ddp.yaml" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_fsdp_checks(fsdp_env, monkeypatch):
    from mistral_sov.distributed import check_fsdp, fsdp_requested
    from mistral_sov.errors import InputError
    from mistral_sov.recipe import QuantizationSection

    assert fsdp_requested()
    # 4-bit is the supported QLoRA + FSDP combination; on CPU accelerate runs it (and plain LoRA) as DDP, and says so.
    assert check_fsdp(QuantizationSection(bits=4), on_cuda=True) is None
    assert "DDP" in check_fsdp(None, on_cuda=False) and "DDP" in check_fsdp(QuantizationSection(bits=4), on_cuda=False)
    with pytest.raises(InputError) as refused:
        check_fsdp(QuantizationSection(bits=8), on_cuda=True)
    assert "FSDP + QLoRA is supported with 4-bit weights only" in refused.value.message
    monkeypatch.setenv("FSDP_VERSION", "1")  # accelerate's default when a config does not name a version
    with pytest.raises(InputError) as refused:
        check_fsdp(None, on_cuda=True)
    assert "FSDP_VERSION" in refused.value.message and "fsdp_version: 2" in refused.value.hint
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_requested() and check_fsdp(QuantizationSection(bits=8), on_cuda=True) is None


def test_fsdp_stores_4bit_weights_in_the_compute_dtype(fsdp_env, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import torch

    from mistral_sov.modeling import quantization_config
    from mistral_sov.recipe import QuantizationSection

    section = QuantizationSection(bits=4, compute_dtype="bfloat16")
    assert quantization_config(section).bnb_4bit_quant_storage == torch.bfloat16  # FSDP shards float tensors only
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert quantization_config(section).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default otherwise


def test_fsdp_qlora_4bit_trains_sharded(tiny_model, tmp_path):
    """bitsandbytes' 4-bit weights, stored in the compute dtype under FSDP, shard and train like one process."""
    pytest.importorskip("bitsandbytes")
    reports = tmp_path / "reports"
    recipe = small_recipe(tiny_model, tmp_path / "runs" / "fsdp", max_steps=12, batch_size=4, save_steps=50)
    recipe["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    done = accelerate_fsdp(tmp_path, recipe, reports)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((reports / "rank0.json").read_text())
    rank1 = json.loads((reports / "rank1.json").read_text())
    assert rank0["train"]["fsdp"] is True
    assert rank1["trainable_sha256"] == rank0["parameters"]["trainable_sha256"]
    # One process (packed weights in uint8, PEFT's k-bit preparation): measured bit-identical train loss and 1e-8
    # relative on the held-out loss; the tolerance is the one above, for the same reasons.
    recipe.update(output={"dir": str(tmp_path / "one" / "run")}, train={**recipe["train"], "batch_size": 8})
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(recipe))
    single = subprocess.run([sys.executable, str(tmp_path / "fsdp_driver.py"), str(tmp_path / "one.yaml"),
                             str(tmp_path / "one")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert rank0["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-5)
    assert rank0["eval"]["after"]["loss"] == pytest.approx(one["eval"]["after"]["loss"], rel=1e-5)


def test_accelerate_launch_runs_the_cli_unchanged(tiny_model, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/ddp.yaml -m mistral_sov finetune RECIPE` as README says:
    two processes, one run folder, one summary, and the training of one process with the same global batch."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "runs" / "two", max_steps=8, batch_size=4)))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "single" / "one", max_steps=8, batch_size=8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
                           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
                           "-m", "mistral_sov", "finetune", str(tmp_path / "two.yaml")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: test-run") == 1  # rank 0 alone renders the summary
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]
    two = json.loads((tmp_path / "runs" / "two" / "run.json").read_text())
    assert two["train"]["processes"] == 2 and two["train"]["steps"] == 8

    one = finetune(load_recipe(tmp_path / "one.yaml"))
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-3)
    assert two["eval"]["after"]["loss"] == pytest.approx(one["eval"]["after"]["loss"], rel=1e-3)
