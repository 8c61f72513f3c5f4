"""The CycloneDX 1.6 ML-BOM inside every signed output: valid by cyclonedx-python-lib's own strict schema validator,
true to the files it names (base model, datasets, the folder itself), covered by the signature, and the same bytes
for the same run."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLES, small_recipe

from mistral_sov.trust.hashing import digest_folder, sha256_file


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    from mistral_sov.trust.keys import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("bom-keys") / "ci")


@pytest.fixture(scope="module")
def run(tiny_model, keys, tmp_path_factory) -> Path:
    """A real two-step run, signed."""
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    folder = tmp_path_factory.mktemp("bom-run")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(tiny_model, folder / "run", max_steps=2)))
    finetune(load_recipe(recipe), sign_key=str(keys[0]))
    return folder / "run"


@pytest.fixture(scope="module")
def exported(run, keys, tmp_path_factory) -> Path:
    from mistral_sov.export.adapter import export_adapter

    out = tmp_path_factory.mktemp("bom-export") / "adapter"
    export_adapter(run, out=out, key=keys[0])
    return out


def _bom(folder: Path) -> dict:
    return json.loads((folder / "bom.cdx.json").read_text())


def _validate(folder: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str((folder / "bom.cdx.json").read_text())
    assert error is None, error


def _hashes(component: dict) -> dict[str, str]:
    return {f["name"]: f["hashes"][0]["content"] for f in component.get("components") or []}


def test_the_run_adapter_bom_is_valid_and_true(run, tiny_model):
    adapter = run / "adapter"
    _validate(adapter)
    bom = _bom(adapter)
    assert bom["specVersion"] == "1.6" and bom["serialNumber"].startswith("urn:uuid:")
    record = json.loads((run / "run.json").read_text())
    assert bom["metadata"]["timestamp"].startswith(record["finished_at"].removesuffix("+00:00"))

    model = bom["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["name"] == "test-run"
    card = model["modelCard"]
    assert card["modelParameters"]["approach"]["type"] == "supervised"
    assert card["modelParameters"]["task"] == "text-generation"
    metrics = {(m["type"], m["slice"].split(", ")[1].split(" ")[0]): float(m["value"])
               for m in card["quantitativeAnalysis"]["performanceMetrics"]}
    assert metrics[("eval_loss", "before")] == record["eval"]["before"]["loss"]
    assert metrics[("eval_loss", "after")] == record["eval"]["after"]["loss"]
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["msov:kind"] == "adapter" and props["msov:lora.r"] == "16" and props["msov:lora.alpha"] == "32.0"
    assert "personal data" in card["considerations"]["ethicalConsiderations"][0]["name"]

    # every file of the folder but the BOM itself, with its real sha256
    real = digest_folder(adapter)
    assert real.pop("bom.cdx.json") and _hashes(model) == real
    assert model["hashes"][0]["content"] == real["adapter_model.safetensors"]

    # the base model: every file with its real sha256, and the model depends on it
    components = {c["bom-ref"]: c for c in bom["components"]}
    base = components["base-model"]
    assert base["type"] == "machine-learning-model" and _hashes(base) == digest_folder(tiny_model)
    edges = {d["ref"]: set(d.get("dependsOn", [])) for d in bom["dependencies"]}
    assert "base-model" in edges["model"]

    # the datasets: the data files' sha256 and row counts, referenced by the model card
    data = [c for c in bom["components"] if c["type"] == "data"]
    assert {c["bom-ref"] for c in data} == {d["ref"] for d in card["modelParameters"]["datasets"]}
    files = {"helpdesk_chat.jsonl": "train", "helpdesk_chat_eval.jsonl": "eval"}
    assert sorted(c["name"] for c in data) == sorted(files)
    for component in data:
        path = SAMPLES / component["name"]
        assert component["hashes"] == [{"alg": "SHA-256", "content": sha256_file(path)}]
        rows = sum(1 for line in path.read_text().splitlines() if line.strip())
        assert component["data"][0]["type"] == "dataset"
        assert {p["name"]: p["value"] for p in component["properties"]} == \
            {"msov:rows": str(rows), "msov:split": files[component["name"]], "msov:format": "chat"}

    # the libraries, at the versions installed here, with pypi purls
    libraries = {c["name"]: c for c in bom["components"] if c["type"] == "library"}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets"):
        assert libraries[name]["version"] == version(name)
        assert libraries[name]["purl"] == f"pkg:pypi/{name}@{version(name).replace('+', '%2B')}"  # purl-encoded
        assert libraries[name]["bom-ref"] in edges["model"]
    assert bom["metadata"]["tools"]["components"][0]["name"] == "msov"


def test_the_bom_is_signed_with_the_folder(cli, exported, keys):
    public = keys[1]
    _validate(exported)
    listed = cli("verify", exported, "--key", public, "--json")
    assert listed.exit_code == 0, listed.output
    assert "bom.cdx.json" in {f["name"] for f in json.loads(listed.stdout)["files"]}

    original = (exported / "bom.cdx.json").read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    (exported / "bom.cdx.json").write_bytes(bytes(changed))
    try:
        tampered = cli("verify", exported, "--key", public)
        assert tampered.exit_code == 4 and "bom.cdx.json" in tampered.output
    finally:
        (exported / "bom.cdx.json").write_bytes(original)
    assert cli("verify", exported, "--key", public).exit_code == 0


def test_the_same_run_gives_the_same_bom(run, exported, tmp_path):
    from mistral_sov.export.adapter import export_adapter

    export_adapter(run, out=tmp_path / "again")
    assert (tmp_path / "again" / "bom.cdx.json").read_bytes() == (exported / "bom.cdx.json").read_bytes()
    registry = tmp_path / "registry"
    export_adapter(run, registry=registry, version="1.2.0")
    entry = _bom(registry / "test-run" / "1.2.0")
    assert entry["metadata"]["component"]["version"] == "1.2.0"
    assert entry["serialNumber"] != _bom(exported)["serialNumber"]
    assert "msov/registry.json" in _hashes(entry["metadata"]["component"])


def test_the_merged_export_has_a_bom(cli, run, keys, tmp_path):
    private, public = keys
    out = tmp_path / "merged"
    result = cli("export", run, "--merge", "--out", out, "--shard-size", "300KB", "--key", private, "--json")
    assert result.exit_code == 0, result.output
    _validate(out)
    model = _bom(out)["metadata"]["component"]
    real = digest_folder(out)
    real.pop("bom.cdx.json")
    assert _hashes(model) == real and "hashes" not in model, "several shards: each one a file component"
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["msov:kind"] == "merged" and props["msov:merge.adapter_id"] == json.loads(result.stdout)["adapter_id"]
    assert cli("verify", out, "--key", public).exit_code == 0


def test_a_bare_peft_adapter_gets_a_bom_too(tiny_model, tmp_path):
    """No run record: the BOM says what the export knows (the weights, the merge, the base) and still validates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mistral_sov.export.adapter import export_adapter
    from mistral_sov.export.merged import export_merged

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")) \
        .save_pretrained(tmp_path / "bare")
    export_adapter(tmp_path / "bare", out=tmp_path / "adapter", base=tiny_model)
    export_merged(tmp_path / "bare", tmp_path / "merged", base=tiny_model)
    for folder in (tmp_path / "adapter", tmp_path / "merged"):
        _validate(folder)
        bom = _bom(folder)
        assert "timestamp" not in bom["metadata"], "no run, no finish time: never the time of the export"
        assert bom["metadata"]["component"]["modelCard"]["modelParameters"]["task"] == "text-generation"
    props = {p["name"]: p["value"] for p in _bom(tmp_path / "merged")["metadata"]["component"]["properties"]}
    assert props["msov:kind"] == "merged" and props["msov:lora.r"] == "4" and props["msov:lora.alpha"] == "8"
