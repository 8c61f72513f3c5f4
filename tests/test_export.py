"""Export: the streamed merge against PEFT's own merge_and_unload, merged folders and registry versions through
the CLI, signatures, refusals, and a kill at a random point."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_recipe

from mistral_sov.errors import UsageError
from mistral_sov.export.stream_merge import merge_into
from mistral_sov.sizes import parse_size

MSOV = [sys.executable, "-m", "mistral_sov"]


def _load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def _make_adapter(base: Path, out: Path, **lora) -> Path:
    """A real PEFT adapter with random (non-zero) B, so every LoRA delta is visible in the merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        **{"target_modules": ["q_proj", "v_proj", "down_proj"], **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # DoRA starts with magnitude = norm (a no-op); move it so the merge must apply it
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sharded_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model re-saved as several shards with an index, as large checkpoints are."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("models") / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).save_pretrained(out,
                                                                                         max_shard_size="300KB")
    for item in tiny_model.iterdir():
        if not item.name.startswith("model") and not (out / item.name).exists():
            shutil.copy(item, out / item.name)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    """A real (two-step) msov run on the tiny model."""
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(tiny_model, folder / "run", max_steps=2)))
    finetune(load_recipe(recipe))
    return folder / "run"


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    from mistral_sov.trust.keys import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "ci")


@pytest.mark.parametrize("model, lora, shard", [
    ("tiny", {}, "5GB"),
    ("sharded", {}, "250KB"),
    ("sharded", {"use_rslora": True, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"down_proj": 3}}, "400KB"),
    ("sharded", {"use_dora": True}, "5GB"),
    ("tiny", {"target_modules": ["embed_tokens", "o_proj"], "modules_to_save": ["lm_head"]}, "300KB"),
], ids=["plain", "sharded", "rslora-patterns", "dora", "embedding-modules_to_save"])
def test_streamed_merge_equals_merge_and_unload(model, lora, shard, tiny_model, sharded_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model if model == "tiny" else sharded_model
    adapter = _make_adapter(base, tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    out.mkdir()
    shutil.copy(base / "config.json", out / "config.json")
    result = merge_into(base, adapter, out, shard_size=parse_size(shard, option="--shard-size"))
    assert result["merged"] > 0

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    batch = torch.randint(4, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = peft_model(batch).logits
    reference = peft_model.merge_and_unload().state_dict()
    merged = _load_weights(out)
    assert set(merged) == set(reference)
    base_weights = _load_weights(base)
    changed = [k for k in merged if not torch.allclose(merged[k], base_weights[k], atol=1e-4)]
    assert len(changed) == result["merged"], "every LoRA target moved, nothing else did"
    worst = max((merged[k] - reference[k]).abs().max().item() for k in merged)
    assert worst <= 1e-6, worst
    assert len(result["files"]) == len(list(out.glob("*.safetensors")))
    if len(result["files"]) > 1:  # sharded output: the index maps every tensor to its shard
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(merged)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(batch).logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_bf16_output_is_the_fp32_merge_rounded(sharded_model, tmp_path):
    adapter = _make_adapter(sharded_model, tmp_path / "adapter")
    (tmp_path / "fp32").mkdir()
    (tmp_path / "bf16").mkdir()
    merge_into(sharded_model, adapter, tmp_path / "fp32")
    merge_into(sharded_model, adapter, tmp_path / "bf16", dtype="BF16")
    full, half = _load_weights(tmp_path / "fp32"), _load_weights(tmp_path / "bf16")
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)


def test_parse_size():
    assert parse_size("5GB", option="--shard-size") == 5 * 10**9
    assert parse_size("500MiB", option="--shard-size") == 500 * 2**20
    assert parse_size("1024", option="--shard-size") == 1024
    with pytest.raises(UsageError, match="--shard-size"):
        parse_size("lots", option="--shard-size")


def test_merge_export_is_a_signed_standard_folder(cli, trained_run, keys, tmp_path):
    from mistral_sov.trust.oms import verify_folder

    private, public = keys
    out = tmp_path / "merged"
    result = cli("export", trained_run, "--merge", "--out", out, "--shard-size", "300KB", "--key", private,
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sig"] == str(tmp_path / "merged.sig") and len(report["files"]) >= 3
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md",
            "model.safetensors.index.json", "msov"} <= names
    assert not list(tmp_path.glob("*.tmp-*")), "the stage is gone"
    verified = verify_folder(out, public)
    assert verified["subject_digest"] == report["subject_digest"]
    export = verified["provenance"]["predicate"]["buildDefinition"]["externalParameters"]["export"]
    assert export["merged_into"].startswith("full-precision base weights")
    assert export["adapter_id"] == report["adapter_id"]

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["base_model"] == "tiny"
    assert all(d.startswith("sha256:") for d in meta["datasets"])
    assert str(tmp_path) not in card and "/" not in meta["base_model"], "no local paths unless asked"

    # the same folder again: refused (exit 3), untouched
    again = cli("export", trained_run, "--merge", "--out", out)
    assert again.exit_code == 3 and "already exists" in again.stderr
    verify_folder(out, public)


def test_adapter_registry_versions_are_immutable(cli, trained_run, keys, tmp_path):
    private, public = keys
    registry = tmp_path / "registry"
    first = cli("export", trained_run, "--adapter", "--version", "1.4.0", "--registry", registry,
                "--key", private, "--json")
    assert first.exit_code == 0, first.output
    published = json.loads(first.stdout)
    folder = registry / "test-run" / "1.4.0"
    assert published["status"] == "published" and published["path"] == str(folder)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "msov", "model.sig"} <= \
        {p.name for p in folder.iterdir()}

    # the adapter id is the signature's subject digest, and the folder verifies
    verified = cli("verify", folder, "--key", public, "--sig", folder / "model.sig", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["subject_digest"] == published["adapter_id"]

    # the same content again is a no-op; other content under the same version is refused with exit 3
    same = cli("export", trained_run, "--adapter", "--version", "1.4.0", "--registry", registry, "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["status"] == "unchanged"
    changed = tmp_path / "changed-run"
    shutil.copytree(trained_run, changed)
    config = json.loads((changed / "adapter" / "adapter_config.json").read_text())
    (changed / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1}))
    refused = cli("export", changed, "--adapter", "--version", "1.4.0", "--registry", registry, "--name",
                  "test-run")
    assert refused.exit_code == 3, refused.output
    assert "already exists with other content" in refused.stderr and "never overwritten" in refused.stderr
    assert cli("export", changed, "--adapter", "--version", "1.5.0", "--registry", registry,
               "--name", "test-run").exit_code == 0

    listed = cli("registry", "list", registry, "--pub", public, "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)["adapters"]
    assert [(r["name"], r["version"]) for r in rows] == [("test-run", "1.4.0"), ("test-run", "1.5.0")]
    assert rows[0]["status"] == "verified" and rows[0]["digest"] == published["adapter_id"]
    assert rows[0]["signed_by"] and rows[1]["status"] == "unsigned"
    assert rows[0]["base_model_digest"] and rows[0]["date"]
    human = cli("registry", "list", registry)
    assert "1.4.0" in human.stdout and "verified" not in human.stdout

    # a second party approves the release (beside the entry, never inside it: the entry's files are unchanged)
    from mistral_sov.trust.keys import generate_keypair

    approver_key, approver_pub = generate_keypair(tmp_path / "approver")
    approved = cli("approve", folder, "--key", approver_key, "--signed-by", public, "--sig", folder / "model.sig")
    assert approved.exit_code == 0, approved.output
    rows = json.loads(cli("registry", "list", registry, "--pub", public, "--json").stdout)["adapters"]
    assert rows[0]["status"] == "verified" and len(rows[0]["approved_by"]) == 1 and rows[1]["approved_by"] == []
    both = cli("verify", folder, "--require", public, "--require", approver_pub, "--sig", folder / "model.sig")
    assert both.exit_code == 0, both.output
    assert "approved by" in both.stdout


def test_exports_load_without_msov(cli, trained_run, tiny_model, tmp_path):
    """What users ship loads in plain transformers / peft: the merged model gives the PEFT model's logits."""
    assert cli("export", trained_run, "--merge", "--out", tmp_path / "merged").exit_code == 0
    assert cli("export", trained_run, "--adapter", "--out", tmp_path / "adapter").exit_code == 0
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r})
ids = tok(["How do I reset my password?"], return_tensors="pt").input_ids
base = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r})
peft = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})
with torch.no_grad():
    torch.testing.assert_close(merged(ids).logits, peft(ids).logits, atol=1e-4, rtol=1e-4)
assert not [m for m in sys.modules if m.startswith("mistral_sov")]
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("args, code, words", [
    (["--merge", "--adapter", "--out", "x"], 2, "exactly one of --merge or --adapter"),
    (["--merge"], 2, "--merge needs --out"),
    (["--adapter", "--registry", "reg", "--version", "1.4"], 2, "semantic version"),
    (["--merge", "--out", "x", "--dtype", "int4"], 2, "--dtype int4"),
    (["--merge", "--out", "x", "--shard-size", "big"], 2, "--shard-size"),
])
def test_usage_errors(cli, trained_run, tmp_path, args, code, words):
    result = cli("export", trained_run, *[tmp_path / a if a in ("x", "reg") else a for a in args])
    assert result.exit_code == code, result.output
    assert words in result.stderr
    assert not (tmp_path / "x").exists()


def test_refusals_name_the_problem(cli, trained_run, tiny_model, tmp_path):
    # a base that changed since training
    moved = tmp_path / "base"
    shutil.copytree(tiny_model, moved)
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("1e-06", "1e-05"))
    result = cli("export", trained_run, "--merge", "--out", tmp_path / "out", "--base", moved)
    assert result.exit_code == 3 and "changed since training: config.json" in result.stderr

    # a base folder stored quantized: never merged into dequantized weights
    config = json.loads((tiny_model / "config.json").read_text())
    quantized = {**config, "quantization_config": {"quant_method": "bitsandbytes"}}
    (moved / "config.json").write_text(json.dumps(quantized))
    result = cli("export", trained_run, "--merge", "--out", tmp_path / "out", "--base", moved)
    assert result.exit_code == 3 and "stored quantized" in result.stderr

    # an adapter variant the streamed merge does not implement
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_qalora": True}))
    result = cli("export", run, "--merge", "--out", tmp_path / "out")
    assert result.exit_code == 3 and "use_qalora is set" in result.stderr

    result = cli("export", tmp_path / "nowhere", "--adapter", "--out", tmp_path / "out")
    assert result.exit_code == 3 and "no such run folder" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_qlora_merge_and_own_chat_template_are_recorded(cli, trained_run, tmp_path):
    """A QLoRA run merges into the full-precision base and says so; a run's own chat template ships with it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    recipe["data"]["chat_template"] = str(template)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    merged = cli("export", run, "--merge", "--out", tmp_path / "merged", "--dtype", "bf16", "--json")
    assert merged.exit_code == 0, merged.output
    provenance = json.loads((tmp_path / "merged" / "msov" / "provenance.json").read_text())
    export = provenance["predicate"]["buildDefinition"]["externalParameters"]["export"]
    assert "full-precision base weights" in export["merged_into"] and "4-bit nf4" in export["merged_into"]
    assert export["trained_with_quantization"]["bits"] == 4
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == template.read_text()

    adapter = cli("export", run, "--adapter", "--out", tmp_path / "adapter", "--json")
    assert adapter.exit_code == 0, adapter.output
    assert "chat_template.jinja" in json.loads(adapter.stdout)["tokenizer_files"]
    assert (tmp_path / "adapter" / "chat_template.jinja").read_text() == template.read_text()
    assert not (tmp_path / "adapter.sig").exists()


def test_killed_export_leaves_nothing(trained_run, sharded_model, keys, tmp_path):
    """SIGKILL at random points: never a folder at the target name, never a signature without a whole folder."""
    private, public = keys
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    summary = json.loads((run / "run.json").read_text())
    from mistral_sov.trust.hashing import digest_folder
    from mistral_sov.record import RunRecord
    from mistral_sov.trust.provenance import write_provenance

    summary["base_model"] = {"path": str(sharded_model), "files": digest_folder(sharded_model)}
    (run / "run.json").write_text(json.dumps(summary))
    # the run as if trained on the sharded base: its record rewritten to match (an unsigned seal allows this)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    write_provenance(run / "adapter", RunRecord.read(run / "run.json"), recipe)

    def start(out):  # not --json: the stage lines on stderr tell where the export is
        return subprocess.Popen([*MSOV, "export", run, "--merge", "--out", out, "--shard-size", "200KB",
                                 "--key", private], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for attempt in range(3):
        out = tmp_path / "out"
        process = start(out)
        # a random stage line (merging, each shard written, signing), then a random few milliseconds more
        stop_after = rng.choice(["merging", "wrote model-00002", "wrote model-00004", "signing"])
        for line in process.stderr:
            if stop_after in line:
                break
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        sig = out.with_name(out.name + ".sig")
        if out.exists():  # it finished before the kill: then it is whole and verifies
            from mistral_sov.trust.oms import verify_folder

            verify_folder(out, public)
            shutil.rmtree(out)
            sig.unlink()
        else:
            assert not sig.exists(), f"seed {seed}, after '{stop_after}': a signature without its folder"
    # the next export to the same target removes what the killed ones left and publishes
    assert start(out).wait() == 0
    assert out.is_dir() and sig.is_file() and not list(tmp_path.glob("out.tmp-*"))


def test_merge_export_signs_only_what_training_sealed(cli, trained_run, keys, tmp_path):
    """Issue 12 item 2: an edited run.json must not become signed provenance."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    summary = json.loads((run / "run.json").read_text())
    summary["train"]["final_loss"] = 0.0001
    (run / "run.json").write_text(json.dumps(summary))
    forged = cli("export", run, "--merge", "--out", tmp_path / "m", "--key", keys[0], "--json")
    assert forged.exit_code == 4 and "run.json" in forged.stdout and "sealed" in forged.stdout
    assert not (tmp_path / "m").exists()
    shutil.copy(trained_run / "run.json", run / "run.json")
    ok = cli("export", run, "--merge", "--out", tmp_path / "m", "--key", keys[0], "--json")
    assert ok.exit_code == 0, ok.stdout
    explained = cli("verify", tmp_path / "m", "--key", keys[1], "--explain")
    assert explained.exit_code == 0 and "sealed at training time" in explained.stdout
    assert "sealed at export time" in explained.stdout


@pytest.mark.parametrize("edit, words", [
    (lambda record: record["train"].update(steps="two"), "field 'train.steps'"),
    (lambda record: record.update(schema=2), "schema 2"),
], ids=["wrong-type", "unknown-schema"])
def test_a_run_json_that_does_not_parse_is_bad_input(cli, trained_run, tmp_path, edit, words):
    """Issue 15: run.json is the typed run record; an edited one that does not parse is exit 3, naming file and
    field, before any work."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = json.loads((run / "run.json").read_text())
    edit(record)
    (run / "run.json").write_text(json.dumps(record))
    result = cli("export", run, "--adapter", "--out", tmp_path / "x", "--json")
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert str(run / "run.json") in error and words in error
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("config, words", [(b"[1]", "expected a JSON object"), (b"\xff\xfe{}", "not UTF-8")])
def test_an_adapter_config_that_is_no_json_object_is_bad_input(cli, tmp_path, config, words):
    """Found in issue 15: a list, or bytes that are not UTF-8, ended in an unexpected error (exit 1)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_bytes(config)
    (run / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    result = cli("export", run, "--adapter", "--out", tmp_path / "x", "--json")
    assert result.exit_code == 3, result.output
    assert "adapter_config.json" in json.loads(result.stdout)["error"] and words in result.stdout
