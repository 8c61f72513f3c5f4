"""Training for real on the tiny model: loss falls, the adapter reloads in plain PEFT, resume works."""

import json
import subprocess
import sys

import pytest
from conftest import small_recipe

from mistral_sov.recipe import load_recipe
from mistral_sov.train.pipeline import finetune


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("run")
    data = small_recipe(tiny_model, root / "out", epochs=3)
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    events = []
    summary = finetune(load_recipe(root / "r.yaml"), on_event=lambda kind, payload: events.append(kind))
    return summary, root / "out", events


def test_loss_falls_by_at_least_30_percent(finished_run):
    summary, _, _ = finished_run
    before, after = summary.eval.before.loss, summary.eval.after.loss
    assert after <= 0.7 * before, (before, after)
    assert summary.train.final_loss <= 0.7 * summary.train.first_loss


def test_run_folder_contents(finished_run):
    summary, out, events = finished_run
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "inputs.json", "loss.png", "metrics.jsonl",
                                                     "recipe.yaml", "run.json"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["train"]["steps"] == summary.train.steps
    assert run["base_model"]["files"]["model.safetensors"]
    assert all(len(f["sha256"]) == 64 for f in run["data"]["train"])
    assert run["data"]["scan"] == {"files": 2, "rows": 340, "counts": {}}  # counts only, never findings
    assert run["versions"]["transformers"] and run["recipe_digest"] == load_recipe(out / "recipe.yaml").digest()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [line["step"] for line in lines if "loss" in line]
    assert logged == sorted(set(logged)) and len(logged) >= summary.train.steps // 2
    assert not out.with_name("out.partial").exists()
    assert "train_begin" in events and "step" in events


def test_adapter_reloads_in_plain_peft_with_same_logits(tiny_model, tmp_path):
    """Train a few steps in memory, save, reload in a fresh process that never imports msov, compare logits."""
    import torch
    import yaml
    from transformers import set_seed

    from mistral_sov.model.load import attach_lora, load_model
    from mistral_sov.train.pipeline import prepare_inputs
    from mistral_sov.train.trainer import build_trainer

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(small_recipe(tiny_model, tmp_path / "out", max_steps=6)))
    recipe = load_recipe(tmp_path / "r.yaml")
    prepared = prepare_inputs(recipe)
    set_seed(0)
    model = attach_lora(load_model(prepared.folder, recipe.model), recipe.lora)
    (tmp_path / "work").mkdir()
    build_trainer(model, prepared.tokenizer, prepared.train.dataset, None, recipe.train, tmp_path / "work",
                  lambda *_: None).train()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([prepared.train.dataset[0]["input_ids"][:40], prepared.train.dataset[1]["input_ids"][:40]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")

    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained(r'{tiny_model}')\n"
        f"model = PeftModel.from_pretrained(base, r'{tmp_path / 'adapter'}').eval()\n"
        f"ids = torch.load(r'{tmp_path / 'ids.pt'}')\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(input_ids=ids).logits, r'{tmp_path / 'logits.pt'}')\n"
        "assert not [m for m in sys.modules if m.startswith('mistral_sov')]\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    reloaded = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(expected, reloaded, atol=1e-5), (expected - reloaded).abs().max()
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # and the adapter changed the model at all, or the comparison above proves nothing
        plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    assert (plain - reloaded).abs().max() > 1e-3


def test_resume_continues_from_checkpoint(tiny_model, tmp_path, write_recipe, cli):
    import yaml

    path = write_recipe(small_recipe(tiny_model, tmp_path / "out", max_steps=10, save_steps=4))
    recipe = load_recipe(path)

    def crash_at_step_6(kind, payload):
        if kind == "step" and payload["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(recipe, on_event=crash_at_step_6)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists(), "a crashed run must not look finished"
    assert (partial / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (partial / "run.json").exists()

    refused = cli("finetune", path)
    assert refused.exit_code == 3 and "unfinished run" in refused.stderr and "--resume" in refused.stderr

    result = cli("finetune", path, "--resume", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["train"]["resumed_from_step"] == 4 and summary["train"]["steps"] == 10
    steps = [json.loads(l)["step"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == sorted(set(steps)) and steps[-1] == 10
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["train"]["max_steps"] == 10
    assert not partial.exists()


def test_eval_and_generate_commands_on_a_run(finished_run, cli):
    from conftest import SAMPLES

    summary, out, _ = finished_run
    result = cli("eval", out, "--data", SAMPLES / "helpdesk_chat_eval.jsonl", "--max-seq-len", "192", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["base"]["loss"] == pytest.approx(summary.eval.before.loss, rel=1e-4)
    assert report["adapter"]["loss"] == pytest.approx(summary.eval.after.loss, rel=1e-4)
    answer = cli("generate", out / "adapter", "--prompt", "The printer PRN-WB-3 is jammed.", "--json")
    assert answer.exit_code == 0, answer.output
    answers = json.loads(answer.stdout)
    assert answers["adapter"] and answers["adapter"] != answers["base"]
    assert cli("eval", out / "metrics.jsonl", "--data", SAMPLES / "helpdesk_chat_eval.jsonl").exit_code == 3
    # Without --data, the run's own held-out files (README: `msov eval RUN [--data FILE]`).
    default = cli("eval", out, "--max-seq-len", "192", "--json")
    assert default.exit_code == 0, default.output
    assert json.loads(default.stdout)["adapter"] == report["adapter"]
    no_recipe = cli("eval", out / "adapter", "--json")
    assert no_recipe.exit_code == 3 and "not a run folder" in json.loads(no_recipe.stdout)["error"]
