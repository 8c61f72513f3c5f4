from pathlib import Path

import pytest
import yaml

from mistral_sov.errors import RecipeError
from mistral_sov.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: t
model:
  path: /models/x
data:
  train: a.jsonl
lora:
  r: 8
train:
  lr: 1.0e-4
output:
  dir: out
"""


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("  r: 8", "  rr: 8"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:7: lora.rr: unknown key; did you mean 'r'?" in err.value.message


def test_unknown_top_level_section_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("train:\n  lr", "trian:\n  lr"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "trian: unknown key; did you mean 'train'?" in err.value.message


def test_wrong_type_names_field(tmp_path):
    path = write(tmp_path, GOOD.replace("  r: 8", "  r: eight"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:7: lora.r:" in err.value.message
    assert "'eight'" in err.value.message


def test_missing_field_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="output: required field is missing"):
        load_recipe(write(tmp_path, GOOD.replace("output:\n  dir: out\n", "")))
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, GOOD + "  bad: [unclosed\n"))


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["train.lr=5e-4", "lora.r=4", "train.max_steps=3"])
    assert recipe.train.lr == 5e-4 and recipe.lora.r == 4 and recipe.train.max_steps == 3
    with pytest.raises(RecipeError, match="train.lrr: unknown key; did you mean 'lr'"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.lr"])


@pytest.mark.parametrize("quantization", ["", "quantization: null\n"], ids=["absent", "null"])
def test_set_switches_an_optional_section_on(tmp_path, quantization):
    # Before: "--set quantization.bits: 'quantization' is not a section" when the recipe said `quantization: null`.
    path = write(tmp_path, GOOD + quantization)
    assert load_recipe(path).quantization is None
    recipe = load_recipe(path, ["quantization.bits=8"])
    assert recipe.quantization.bits == 8 and recipe.quantization.quant_type == "nf4"  # the rest: defaults
    assert recipe.quantization.double_quant is True and recipe.quantization.compute_dtype == "bfloat16"
    assert load_recipe(path, ["quantization.bits=4"]).quantization.bits == 4
    with pytest.raises(RecipeError, match=r"quantization.bitz: unknown key; did you mean 'bits'"):
        load_recipe(path, ["quantization.bitz=4"])
    with pytest.raises(RecipeError, match=r"quantization.colour: unknown key; valid keys: bits, quant_type, "
                                          r"double_quant, compute_dtype"):
        load_recipe(path, ["quantization.colour=4"])
    with pytest.raises(RecipeError, match=r"quantization.bits: Input should be 4 or 8"):
        load_recipe(path, ["quantization.bits=3"])
    with pytest.raises(RecipeError, match="train.max_steps: Input should be a valid integer"):
        load_recipe(path, ["train.max_steps.x=1"])  # a scalar field is not a section to switch on


def test_relative_paths_resolve_from_recipe_folder(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.data.train[0].path == str(tmp_path / "a.jsonl")
    assert recipe.output.dir == str(tmp_path / "out")
    hub = load_recipe(write(tmp_path, GOOD.replace("/models/x", "mistralai/Mistral-7B-v0.1")))
    assert hub.model.path == "mistralai/Mistral-7B-v0.1"  # left as written, so the offline check can name it


def test_digest_is_canonical(tmp_path):
    a = load_recipe(write(tmp_path, GOOD))
    b = load_recipe(write(tmp_path, GOOD.replace("lr: 1.0e-4", "lr: 0.0001")))
    c = load_recipe(write(tmp_path, GOOD), ["train.seed=1"])
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize("recipe_file", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe_file):
    recipe = load_recipe(recipe_file)
    assert recipe.name == yaml.safe_load(recipe_file.read_text())["name"]
    for item in recipe.data.train + recipe.data.eval:
        assert Path(item.path).is_file(), item.path


@pytest.mark.parametrize("config", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load_in_accelerate(config):
    from accelerate.commands.config.config_args import ClusterConfig

    loaded = ClusterConfig.from_yaml_file(str(config))
    assert loaded.num_processes >= 2 and loaded.mixed_precision == ("bf16" if "deepspeed" in config.name else "no")
