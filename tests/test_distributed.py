"""Two processes (torchrun, gloo, CPU) train like one: same adapter on both ranks, one output folder, same loss.

FSDP too, launched by `accelerate launch --config_file recipes/accelerate/fsdp.yaml`. On CPU accelerate 1.15 never
turns FSDP on (a CPU launch stays MULTI_CPU and trains as DDP; msov warns), but torch's FSDP2 runs with gloo: the
FSDP driver below makes accelerate take its FSDP2 path anyway, as it would on GPUs, so that msov's handling of a
sharded model (gathering the adapter, evaluating and generating through the shards) runs for real here.
Both engines resume a 2-rank run that crashed (one rank failing) to the adapter of an uninterrupted run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import free_port, small_recipe, torchrun

from mistral_sov.recipe import load_recipe
from mistral_sov.train.pipeline import finetune

DRIVER = """
import json, os, sys
from mistral_sov.train.pipeline import finetune
from mistral_sov.recipe import load_recipe
summary = finetune(load_recipe(sys.argv[1]))
with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(summary.to_json(), f)
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

    from mistral_sov.evaluate import evaluation_loss
    from mistral_sov.recipe import Recipe
    from mistral_sov.train.engine import trainable_digest, trained_tensors
    from mistral_sov.train.pipeline import prepare_inputs
    from mistral_sov.train.trainer import make_collator

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
    assert trainable_digest(trained_tensors(tuned)) == rank0["parameters"]["trainable_sha256"]
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
    import mistral_sov.model.load

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(mistral_sov.model.load, "load_model", no_loading)
    recipe = small_recipe(tiny_model, tmp_path / "out", max_steps=2)
    recipe["quantization"] = {"bits": 8, "compute_dtype": "float32"}
    result = cli("finetune", write_recipe(recipe))
    assert result.exit_code == 3, result.output
    assert "quantization.bits: 8-bit weights cannot be sharded by FSDP" in result.stderr
    assert "4-bit" in result.stderr and "ddp.yaml" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_fsdp_checks(fsdp_env, monkeypatch):
    from mistral_sov.errors import InputError
    from mistral_sov.recipe import QuantizationSection
    from mistral_sov.train.engine import check_fsdp, fsdp_requested

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

    from mistral_sov.model.load import quantization_config
    from mistral_sov.train.engine import fsdp_requested
    from mistral_sov.recipe import QuantizationSection

    section = QuantizationSection(bits=4, compute_dtype="bfloat16")
    assert quantization_config(section, fsdp=fsdp_requested()).bnb_4bit_quant_storage == torch.bfloat16  # FSDP shards float tensors only
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert quantization_config(section, fsdp=fsdp_requested()).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default otherwise


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
    assert two["train"]["final_loss"] == pytest.approx(one.train.final_loss, rel=1e-3)
    assert two["eval"]["after"]["loss"] == pytest.approx(one.eval.after.loss, rel=1e-3)


# A 2-rank run through the CLI, as a user launches it. Rank 1 fails after step FAIL_AT_STEP when asked (a crashed GPU
# or node), and rank 0 appends every step it trains to STEPS_LOG: a resumed run must train only the missing steps,
# since one that silently started again would end with the same adapter too.
CLI_DRIVER = """
import os, sys
import mistral_sov.train.trainer as training
from transformers import TrainerCallback

class CrashAndCount(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ["RANK"] == "0":
            with open(os.environ["STEPS_LOG"], "a") as log:
                log.write("%d\\n" % state.global_step)
        if state.global_step == int(os.environ.get("FAIL_AT_STEP", "0")) and os.environ["RANK"] == "1":
            raise RuntimeError("simulated failure on rank 1")

original = training.trainer_callbacks
training.trainer_callbacks = lambda *a, **k: original(*a, **k) + [CrashAndCount()]
from mistral_sov.cli import app
app(["finetune", *sys.argv[1:]])
"""


def launch_two(tmp_path, engine: str, recipe: Path, *args: str, steps_log: Path, fail_at_step: int = 0):
    """`msov finetune RECIPE ARGS` on 2 ranks: torchrun (DDP), or accelerate launch with the shipped FSDP config."""
    script = tmp_path / f"{engine}_cli.py"
    script.write_text((FORCE_FSDP_ON_CPU if engine == "fsdp" else "") + CLI_DRIVER)
    if engine == "fsdp":
        accelerate = Path(sys.executable).with_name("accelerate")
        if not accelerate.exists():
            pytest.skip("accelerate's launcher is not installed beside this Python")
        launcher = [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/fsdp.yaml"),
                    "--num_processes", "2", "--mixed_precision", "no",
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    else:
        launcher = [torchrun(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPS_LOG": str(steps_log), "FAIL_AT_STEP": str(fail_at_step)}
    return subprocess.run([*launcher, str(script), str(recipe), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def logged_losses(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == sorted(set(steps)), steps  # no step logged twice, none out of order
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_two_rank_run_that_crashed_resumes_to_the_uninterrupted_adapter(engine, tiny_model, tmp_path):
    from mistral_sov.train.checkpoints import latest_checkpoint

    runs = tmp_path / "runs"
    for name in ("straight", "crashed"):  # the same recipe but for where it goes
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            small_recipe(tiny_model, runs / name, max_steps=12, batch_size=4, save_steps=5)))
    straight = launch_two(tmp_path, engine, tmp_path / "straight.yaml", steps_log=tmp_path / "straight.steps")
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Run 1: rank 1 fails after step 7; checkpoint-5 is complete, nothing is published.
    crashed = launch_two(tmp_path, engine, tmp_path / "crashed.yaml", steps_log=tmp_path / "first.steps",
                         fail_at_step=7)
    assert crashed.returncode != 0 and "simulated failure on rank 1" in crashed.stderr, crashed.stderr[-3000:]
    checkpoints = runs / "crashed.partial" / "checkpoints"
    assert not (runs / "crashed").exists() and sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-5"]
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-5"
    if engine == "fsdp":  # accelerate's sharded checkpoint (torch.distributed.checkpoint, one file per rank)
        saved = sorted(p.name for p in (checkpoints / "checkpoint-5" / "pytorch_model_fsdp_0").iterdir())
        assert saved == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert (checkpoints / "checkpoint-5" / "optimizer_0" / ".metadata").is_file()

    # Run 2: the same launch plus --resume trains steps 6-12 only and ends with the uninterrupted run's adapter.
    resumed = launch_two(tmp_path, engine, tmp_path / "crashed.yaml", "--resume", steps_log=tmp_path / "second.steps")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(s) for s in (tmp_path / "second.steps").read_text().split()] == list(range(6, 13))
    run = json.loads((runs / "crashed" / "run.json").read_text())
    reference = json.loads((runs / "straight" / "run.json").read_text())
    assert run["train"]["fsdp"] is reference["train"]["fsdp"] is (engine == "fsdp")
    assert run["train"]["resumed_from_step"] == 5 and run["train"]["steps"] == 12
    # Bit-identical: the checkpoint holds the adapter, Adam's moments, the scheduler and every rank's RNG state, and
    # the data order is a function of the seed and the epoch; nothing is recomputed differently after a resume.
    assert run["parameters"]["trainable_sha256"] == reference["parameters"]["trainable_sha256"]
    assert run["eval"]["after"] == reference["eval"]["after"]
    assert not (runs / "crashed.partial").exists()

    # metrics.jsonl: run 1's lines after step 5 were dropped, so every step is logged once, with the uninterrupted
    # run's loss. Step 6 aside: the Trainer logs the mean loss since its last log, which after a resume from step 5
    # is step 6 alone and in the uninterrupted run steps 5 and 6.
    losses, expected = logged_losses(runs / "crashed"), logged_losses(runs / "straight")
    assert sorted(losses) == sorted(expected) == [1, 2, 4, 6, 8, 10, 12]
    assert {s: v for s, v in losses.items() if s != 6} == {s: v for s, v in expected.items() if s != 6}


def test_every_rank_must_find_the_checkpoint_to_resume(tiny_model, tmp_path):
    """A rank that saw no checkpoint (a node without the shared run folder) would train a different run: it refuses,
    in the words rank 0 uses, so that all_ranks_agree reports it once, or names the rank when only it failed."""
    from mistral_sov.errors import InputError
    from mistral_sov.recipe import Recipe
    from mistral_sov.train.run_folder import check_targets

    recipe = Recipe.model_validate(small_recipe(tiny_model, tmp_path / "out"))
    for main in (True, False):
        with pytest.raises(InputError) as refused:
            check_targets(recipe, tmp_path / "out", tmp_path / "out.partial", resume=True, overwrite=False, main=main)
        where = tmp_path / "out.partial" / "checkpoints"
        assert refused.value.message == f"--resume: no checkpoint found in '{where}'."
        assert "shared file system" in refused.value.hint


def test_resume_refuses_a_checkpoint_of_the_other_engine(tiny_model, tmp_path, write_recipe, cli):
    """An FSDP checkpoint resumed without FSDP (or a DDP one under FSDP) fails in the Trainer only after the model is
    loaded, with a ValueError or a FileNotFoundError on optimizer_0 (measured): msov refuses it first, exit 3."""
    from mistral_sov.errors import InputError
    from mistral_sov.train.checkpoints import check_resumable

    path = write_recipe(small_recipe(tiny_model, tmp_path / "out", max_steps=12, save_steps=5))
    checkpoint = tmp_path / "out.partial" / "checkpoints" / "checkpoint-5"
    (checkpoint / "pytorch_model_fsdp_0").mkdir(parents=True)  # the layout of the FSDP test's real checkpoint
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "msov-complete").write_text("ok\n")  # what msov writes once a checkpoint is whole
    result = cli("finetune", path, "--resume")
    assert result.exit_code == 3, result.output
    assert (f"--resume: '{checkpoint}' was written by a run under FSDP and this launch trains without FSDP"
            in " ".join(result.stderr.split()))
    assert "same accelerate config" in result.stderr and not (tmp_path / "out").exists()

    ddp = tmp_path / "ddp" / "checkpoint-5"
    ddp.mkdir(parents=True)
    (ddp / "adapter_model.safetensors").write_bytes(b"")
    check_resumable(ddp, fsdp=False)
    with pytest.raises(InputError, match=r"without FSDP \(one process or DDP\) and this launch trains under FSDP"):
        check_resumable(ddp, fsdp=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_saves_the_whole_adapter(stage, tiny_model, tmp_path):
    """DeepSpeed ZeRO-2/3 with the shipped configs (gloo on CPU; fp32 so it compares with one process). Under
    ZeRO-3 each rank holds a slice of every parameter: before msov gathered the adapter it published 28 LoRA
    tensors of shape (0,) with exit 0."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    accelerate = Path(sys.executable).with_name("accelerate")
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "runs" / "ds", max_steps=8, batch_size=4)))
    done = subprocess.run([str(accelerate), "launch", "--config_file",
                           str(REPO / f"recipes/accelerate/deepspeed-zero{stage}.yaml"), "--mixed_precision", "no",
                           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
                           "-m", "mistral_sov", "finetune", str(tmp_path / "ds.yaml")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = tmp_path / "runs" / "ds" / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())

    (tmp_path / "one.yaml").write_text(yaml.safe_dump(
        small_recipe(tiny_model, tmp_path / "single" / "one", max_steps=8, batch_size=8)))
    one = finetune(load_recipe(tmp_path / "one.yaml"))
    reference = load_file(Path(one.adapter_dir) / "adapter_model.safetensors")
    assert tensors.keys() == reference.keys()
    # Measured: at most 1.2e-6 apart (reduction order across 2 ranks); a wrong or missing gather is O(1e-2) or more.
    assert max((tensors[k] - reference[k]).abs().max().item() for k in tensors) < 1e-4
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)  # reloads in plain PEFT
    run = json.loads((tmp_path / "runs" / "ds" / "run.json").read_text())
    assert run["eval"]["after"]["loss"] == pytest.approx(one.eval.after.loss, rel=1e-5)
