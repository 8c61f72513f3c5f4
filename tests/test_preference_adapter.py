"""model.adapter: training starts from a published adapter (SFT, then DPO from it), checked and recorded by digest."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_preference import preference_rows, write_jsonl


def sft_then_dpo_recipe(tiny_model: Path, root: Path, adapter: Path, out: str, **train) -> dict:
    from conftest import small_recipe

    data = small_recipe(tiny_model, root / out, method="dpo", logging_steps=1, **train)
    data["model"]["adapter"] = str(adapter)
    data["data"] = {"train": str(root / "pairs.jsonl"), "eval": str(root / "pairs_eval.jsonl")}
    return data


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory):
    """An SFT run on the helpdesk chats (its adapter is where the DPO runs start), and the preference files."""
    import yaml
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    root = tmp_path_factory.mktemp("sft-dpo")
    (root / "sft.yaml").write_text(yaml.safe_dump(small_recipe(tiny_model, root / "sft", max_steps=6)))
    record = finetune(load_recipe(root / "sft.yaml"))
    write_jsonl(root / "pairs.jsonl", preference_rows(48, 21))
    write_jsonl(root / "pairs_eval.jsonl", preference_rows(16, 22))
    return record, root


@pytest.fixture(scope="module")
def dpo_from_sft(sft_run, tiny_model):
    import yaml

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    sft, root = sft_run
    (root / "dpo.yaml").write_text(yaml.safe_dump(sft_then_dpo_recipe(tiny_model, root, root / "sft" / "adapter",
                                                                      "dpo", epochs=2)))
    return finetune(load_recipe(root / "dpo.yaml")), root


def test_dpo_from_an_sft_adapter_starts_with_the_sft_model_as_its_reference(dpo_from_sft, sft_run):
    """At step 0 the policy is the SFT adapter and so is the reference (not the bare base): every reward is
    exactly 0, held out and in the first logged step; then the preference is learned."""
    record, root = dpo_from_sft
    before, after = record.eval.before, record.eval.after
    assert before.reward_margin == 0.0 and before.reward_accuracy == 0.0, before
    assert before.loss == pytest.approx(0.693147, abs=1e-6)
    lines = [json.loads(line) for line in (root / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in lines if "loss" in line)
    assert first["step"] == 1 and first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    assert after.reward_accuracy > 0.9 and after.reward_margin > before.reward_margin, after
    # the published adapter is the policy alone (the frozen reference copy is not part of it), the same size
    adapter = root / "dpo" / "adapter"
    assert not (adapter / "reference").exists()
    assert record.parameters.total == sft_run[0].parameters.total
    assert record.parameters.trainable == sft_run[0].parameters.trainable


def test_the_start_adapter_is_recorded_by_digest(dpo_from_sft):
    record, root = dpo_from_sft
    start = root / "sft" / "adapter"
    expected = {name: hashlib.sha256((start / name).read_bytes()).hexdigest()
                for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert record.start_adapter.path == str(start) and record.start_adapter.files == expected
    run_json = json.loads((root / "dpo" / "run.json").read_text())
    assert run_json["start_adapter"]["files"] == expected
    build = json.loads((root / "dpo" / "adapter" / "msov" / "provenance.json").read_text())["predicate"][
        "buildDefinition"]
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    assert deps["start_adapter/adapter_model.safetensors"]["digest"]["sha256"] == expected["adapter_model.safetensors"]
    assert deps["start_adapter/adapter_model.safetensors"]["annotations"] == {"role": "start_adapter"}
    assert build["externalParameters"]["recipe"]["model"]["adapter"] == str(start)
    from mistral_sov.trust.provenance import explain

    doc = json.loads((root / "dpo" / "adapter" / "msov" / "provenance.json").read_text())
    assert {f["sha256"] for f in explain(doc)["start_adapter"]} == set(expected.values())


def test_sft_continues_training_from_the_adapter(sft_run, tiny_model, write_recipe):
    """SFT from model.adapter starts where the adapter ended: its held-out loss before training is the SFT run's
    after training."""
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    sft, root = sft_run
    data = small_recipe(tiny_model, root / "sft-more", max_steps=2)
    data["model"]["adapter"] = str(root / "sft" / "adapter")
    record = finetune(load_recipe(write_recipe(data)))
    assert record.eval.before.loss == pytest.approx(sft.eval.after.loss, rel=1e-6)
    assert record.eval.after.loss < record.eval.before.loss


def test_resume_refuses_a_changed_start_adapter_and_resumes_bit_identical_from_the_same(sft_run, tiny_model,
                                                                                         tmp_path, write_recipe):
    from safetensors.torch import load_file, save_file

    from mistral_sov.errors import InputError
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    _, root = sft_run
    start = tmp_path / "start"
    shutil.copytree(root / "sft" / "adapter", start)

    def recipe(out: str):
        data = sft_then_dpo_recipe(tiny_model, root, start, f"{tmp_path.name}-{out}", max_steps=4, save_steps=2)
        data["lora"]["dropout"] = 0.1  # the policy's dropout draws random numbers: resume restores the RNG too
        return load_recipe(write_recipe(data, f"{out}.yaml"))

    whole = finetune(recipe("whole"))

    def crash_at_step_3(kind, payload):
        if kind == "step" and payload["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(recipe("crashed"), on_event=crash_at_step_3)
    original = (start / "adapter_model.safetensors").read_bytes()
    tensors = load_file(start / "adapter_model.safetensors")
    save_file({k: v + 1e-3 if "lora_B" in k else v for k, v in tensors.items()}, start / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"start adapter file 'adapter_model.safetensors' \(model.adapter\) "
                                         r"changed since the run started") as error:
        finetune(recipe("crashed"), resume=True)
    assert error.value.exit_code == 3
    (start / "adapter_model.safetensors").write_bytes(original)
    resumed = finetune(recipe("crashed"), resume=True)
    assert resumed.train.resumed_from_step == 2 and resumed.train.steps == 4
    assert resumed.parameters.trainable_sha256 == whole.parameters.trainable_sha256
    assert resumed.train.final_loss == whole.train.final_loss


def refused(recipe_data: dict, write_recipe) -> str:
    from mistral_sov.errors import InputError
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import prepare_inputs

    with pytest.raises(InputError) as error:
        prepare_inputs(load_recipe(write_recipe(recipe_data)))
    assert error.value.exit_code == 3
    return str(error.value)


def test_a_symlinked_adapter_is_refused(sft_run, tiny_model, tmp_path, write_recipe):
    _, root = sft_run
    link = tmp_path / "linked"
    link.symlink_to(root / "sft" / "adapter", target_is_directory=True)
    message = refused(sft_then_dpo_recipe(tiny_model, root, link, "never"), write_recipe)
    assert "model.adapter" in message and "symbolic link" in message
    inside = tmp_path / "inside"
    inside.mkdir()
    shutil.copy(root / "sft" / "adapter" / "adapter_config.json", inside)
    (inside / "adapter_model.safetensors").symlink_to(root / "sft" / "adapter" / "adapter_model.safetensors")
    message = refused(sft_then_dpo_recipe(tiny_model, root, inside, "never"), write_recipe)
    assert "adapter_model.safetensors is a symbolic link" in message


def test_unusable_start_adapters_are_refused_naming_the_field(sft_run, tiny_model, tmp_path, write_recipe):
    _, root = sft_run
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(root / "sft" / "adapter" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    assert "safetensors only" in refused(sft_then_dpo_recipe(tiny_model, root, pickled, "never"), write_recipe)
    assert "run folder, not an adapter folder" in refused(
        sft_then_dpo_recipe(tiny_model, root, root / "sft", "never"), write_recipe)
    other_rank = sft_then_dpo_recipe(tiny_model, root, root / "sft" / "adapter", "never")
    other_rank["lora"]["r"] = 8
    message = refused(other_rank, write_recipe)
    assert "r is 16, but the recipe's lora.r is 8" in message
    elsewhere = tmp_path / "elsewhere"  # an adapter whose sealed provenance names a base of another architecture
    shutil.copytree(root / "sft" / "adapter", elsewhere)
    provenance = elsewhere / "msov" / "provenance.json"
    provenance.write_text(provenance.read_text().replace('"MistralForCausalLM"', '"LlamaForCausalLM"'))
    message = refused(sft_then_dpo_recipe(tiny_model, root, elsewhere, "never"), write_recipe)
    assert "trained on a base model of architecture LlamaForCausalLM" in message


def test_an_adapter_for_a_base_of_another_shape_is_refused(tiny_model, tmp_path, write_recipe):
    """TRL's recorded adapter was made for a model of hidden size 32; the tiny model's is not: exit 3, naming the
    tensor and both shapes, before any training."""
    from conftest import small_recipe

    from mistral_sov.errors import InputError
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    data = small_recipe(tiny_model, tmp_path / "out", max_steps=1)
    data["model"]["adapter"] = str(Path(__file__).resolve().parent / "trl_dpo" / "adapter")
    data["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    with pytest.raises(InputError, match=r"model.adapter: .*adapter_model.safetensors: tensor '.*' has shape "
                                         r"\(\d+, \d+\), but the base model \(model.path\) needs") as error:
        finetune(load_recipe(write_recipe(data)))
    assert error.value.exit_code == 3


def test_signed_dpo_from_an_adapter_reproduces(sft_run, tiny_model, tmp_path, cli):
    """The signed provenance names the start adapter by digest; `msov reproduce` checks it and re-trains to the
    same bytes."""
    import yaml

    _, root = sft_run
    recipe = sft_then_dpo_recipe(tiny_model, root, root / "sft" / "adapter", f"{tmp_path.name}-signed", max_steps=3)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("keygen", "--out", tmp_path / "keys" / "signer").exit_code == 0
    trained = cli("finetune", tmp_path / "r.yaml", "--sign-key", tmp_path / "keys" / "signer.pem", "--json")
    assert trained.exit_code == 0, trained.output
    adapter = Path(recipe["output"]["dir"]) / "adapter"
    result = cli("reproduce", adapter, "--key", tmp_path / "keys" / "signer.pub", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "identical"


def test_model_card_names_the_method_the_preference_data_and_the_start_adapter(dpo_from_sft, tmp_path):
    import yaml

    from mistral_sov.export.adapter import export_adapter

    record, root = dpo_from_sft
    export_adapter(root / "dpo", out=tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "dpo" in yaml.safe_load(card.split("---")[1])["tags"]
    assert "| training method | DPO (sigmoid loss, beta 0.1, label smoothing 0.0; reference: the start adapter) |" \
        in card
    pairs = record.data.train[0]
    assert f"| preference data | `sha256:{pairs.sha256}` ({pairs.rows} pairs, train) |" in card
    assert f"`sha256:{record.start_adapter.files['adapter_model.safetensors']}`" in card


def test_the_reference_adapter_stays_the_start_adapter_while_the_policy_moves():
    """attach_lora(start=..., reference=...): the policy and the frozen reference both begin as the start adapter;
    the reference pass switches to the frozen copy and back, leaving the policy's gradients on."""
    import torch
    from test_preference import TRL, msov_rows
    from transformers import AutoModelForCausalLM

    from mistral_sov.model.load import attach_lora
    from mistral_sov.recipe import LoraSection
    from mistral_sov.train.preference import (REFERENCE_ADAPTER, PairCollator, drop_reference, reference_model,
                                              sequence_logps)

    section = LoraSection(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(TRL / "base", dtype="float32")
    model = attach_lora(base, section, start=TRL / "adapter", reference=REFERENCE_ADAPTER).eval()
    batch = PairCollator(pad_token_id=3)(msov_rows(json.loads((TRL / "trl_dpo.json").read_text())["rows"]))
    with torch.no_grad():
        policy, _ = sequence_logps(model, batch)
    with reference_model(model):
        reference, _ = sequence_logps(model, batch)
    assert torch.equal(policy, reference)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(0.05)
        moved, _ = sequence_logps(model, batch)
    with reference_model(model):
        still, _ = sequence_logps(model, batch)
    assert not torch.allclose(moved, policy) and torch.equal(still, reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert model.active_adapter == "default"
    drop_reference(model)
    assert list(model.peft_config) == ["default"]
    assert not any(f".{REFERENCE_ADAPTER}." in n for n, _ in model.named_parameters())


def test_shipped_preference_recipes_parse_and_chain_onto_the_demo():
    from mistral_sov.recipe import load_recipe

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    demo, chained = load_recipe(recipes / "tiny-demo.yaml"), load_recipe(recipes / "tiny-dpo-from-sft.yaml")
    assert chained.model.adapter == str(Path(demo.output.dir) / "adapter")  # resolved from the recipe's folder
    assert chained.lora.model_dump(exclude={"dropout"}) == demo.lora.model_dump(exclude={"dropout"})
    assert chained.train.method == "dpo"
    assert load_recipe(recipes / "tiny-orpo.yaml").train.method == "orpo"


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_two_ranks_train_from_an_adapter_like_one_process(sft_run, tiny_model, tmp_path, method):
    """DDP (torchrun, gloo, CPU): 2 ranks x 4 pairs learn as 1 process x 8, starting from the SFT adapter; for DPO
    the reference pass switches to the frozen reference adapter inside the DDP wrapper."""
    import yaml
    from conftest import two_ranks_then_one

    _, root = sft_run
    for name, batch in (("ddp", 4), ("one", 8)):
        data = sft_then_dpo_recipe(tiny_model, root, root / "sft" / "adapter", f"{tmp_path.name}-{name}",
                                   max_steps=4, batch_size=batch)
        data["train"]["method"] = method
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    rank0, one = two_ranks_then_one(tmp_path, tmp_path / "ddp.yaml", tmp_path / "one.yaml")
    assert rank0["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-3, abs=1e-5)
    assert rank0["eval"]["after"]["reward_margin"] == pytest.approx(one["eval"]["after"]["reward_margin"], rel=1e-3)
    if method == "dpo":
        assert rank0["eval"]["before"]["reward_margin"] == 0.0
