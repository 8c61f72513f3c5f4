"""Recipes: the whole training run as plain data. YAML in, validated pydantic object out.

A recipe reads top to bottom like the run it describes: which model, which data, which adapter, how to train,
where to write. Relative paths are resolved from the recipe file's folder, so a recipe and its data travel together.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    path: str = Field(description="local folder holding config.json, tokenizer and *.safetensors")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_pickle: bool = Field(False, description="allow pickle .bin weights (unsafe: runs code on load)")
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "msov_packed_sdpa"] = Field(
        "sdpa", description="msov_packed_sdpa: SDPA row by row inside packed bins, with no [seq, seq] mask "
        "(the same result as sdpa; memory linear in the rows, faster on CPU)")
    base_training_flops: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False, description="the base model's pre-training compute in FLOPs (e.g. 2.5e24), "
        "as its provider states it: the run record gives the fine-tune's share of it")
    adapter: Optional[str] = Field(
        None, description="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. RUN/adapter) "
        "training starts from instead of a fresh adapter; for dpo it is the reference model too")


class QuantizationSection(_Strict):
    """QLoRA: the frozen base is loaded quantized by bitsandbytes; the LoRA adapters train in compute_dtype."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    upcast_unquantized: bool = Field(False, description="hold the parameters left unquantized (embeddings, norms, "
                                     "output head) in fp32, as PEFT's prepare_model_for_kbit_training does; "
                                     "default: in compute_dtype (half their memory and a half-precision stream)")


class DataFile(_Strict):
    path: str
    format: Literal["auto", "chat", "sharegpt", "instruction", "completion", "preference"] = "auto"
    split: Optional[str] = Field(None, description="which split of a `datasets` DatasetDict folder to read")


class DataSection(_Strict):
    train: list[DataFile] = Field(min_length=1)
    eval: list[DataFile] = Field(default_factory=list)
    chat_template: Optional[str] = Field(None, description="jinja file overriding the tokenizer's chat template")
    tokenizer: Optional[Literal["mistral", "template"]] = Field(
        None, description="chat rows encoded by mistral-common (mistral) or the chat template (template); "
                          "default: mistral when the model folder ships tekken.json or tokenizer.model.v*")
    train_on: Literal["completion", "all"] = "completion"
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = Field(True, description="pack the rows of a batch into padding-free sequences of "
                                            "train.max_seq_len tokens, attention confined to each row")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        # `train: data.jsonl` is the common case; a single file need not be a list.
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


class LoraSection(_Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainSection(_Strict):
    method: Literal["sft", "dpo", "orpo"] = Field("sft", description="sft: learn the answers; dpo: learn to prefer "
                                                  "the chosen answer of preference pairs over the rejected one (DPO); "
                                                  "orpo: the same without a reference model (ORPO)")
    beta: float = Field(0.1, gt=0, description="dpo: how far the policy may move from the reference (the base)")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: the DPO loss (sigmoid) or IPO")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo sigmoid: the share of pairs assumed "
                                   "mislabelled (conservative DPO)")
    precompute_ref: bool = Field(False, description="dpo: compute the reference log-probabilities once per pair "
                                 "before training (one forward pass per step instead of two)")
    epochs: float = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="when set, overrides epochs")
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(512, gt=8)
    seed: int = 42
    gradient_checkpointing: bool = False
    offload_activations: bool = Field(False, description="with gradient_checkpointing: keep each checkpointed "
                                      "layer's input in (pinned) CPU memory until backward needs it (no-op on CPU)")
    loss_chunk: int = Field(1024, gt=0, description="supervised positions per chunk of the LM head + loss (no "
                            "[tokens, vocab] logits tensor ever exists whole)")
    mlp_chunk: int = Field(2048, gt=0, description="with gradient_checkpointing: tokens per chunk of each layer's "
                           "MLP, recomputed chunk by chunk in backward (rows of at most this many tokens: no change)")
    group_by_length: bool = Field(True, description="without data.packing, batch rows of like length together")
    torch_compile: bool = Field(False, description="compile the model with torch.compile (opt-in)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="mixed-precision compute on the accelerator")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "paged_adamw_8bit"] = "adamw_torch"
    logging_steps: int = Field(5, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0, description="evaluate every N steps; default: at the end")
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)
    tensorboard: bool = Field(False, description="also write TensorBoard event files to <output.dir>/tensorboard/ "
                              "(local files only; view with `tensorboard --logdir`)")


class OutputSection(_Strict):
    dir: str
    sign_key: Optional[str] = Field(None, description="private key (.pem) to sign the adapter with, kept outside "
                                    "output folders, passphrase from $MSOV_KEY_PASSPHRASE; or a key in an HSM "
                                    "(pkcs11:token=...;object=..., PIN from $MSOV_PKCS11_PIN)")

    @field_validator("sign_key")
    @classmethod
    def _no_pin_in_a_recipe(cls, value: Optional[str]) -> Optional[str]:
        # the resolved recipe is recorded in the run folder and in the signed provenance that ships with the adapter
        if value and value[:7].lower() == "pkcs11:" and "pin-value=" in value.lower():
            raise ValueError("a PIN (pin-value) in a recipe would be recorded in the run's provenance and shipped "
                             "with the adapter; use pin-source=file:PATH or $MSOV_PKCS11_PIN")
        return value


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: ModelSection
    quantization: Optional[QuantizationSection] = None
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection

    @model_validator(mode="after")
    def _warmup_one_way(self) -> "Recipe":
        if self.train.warmup_steps and self.train.warmup_ratio:
            raise ValueError("train: set warmup_steps or warmup_ratio, not both")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON form: the identity of the run's configuration."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading -----------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, apply `a.b=c` overrides, validate, and resolve relative paths from its folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections (name, model, data, lora, train, output).")
    lines = _line_map(node)
    for item in overrides or []:
        _apply_override(raw, item)
    recipe = validate_recipe(raw, source=str(path), lines=lines)
    return resolve_paths(recipe, path.resolve().parent)


def validate_recipe(raw: dict, *, source: str = "recipe", lines: dict | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_explain(exc, source, lines or {}), hint="`msov finetune RECIPE --dry-run` checks a "
                          "recipe without training; README.md lists every field.") from None


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(p: str) -> str:
        candidate = Path(p).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    data = recipe.model_dump()
    model_path = data["model"]["path"]
    # A hub id ('org/name', no folder 'org' here) stays as written so the offline check can name it (exit 5);
    # any other relative path resolves, so a missing folder is reported as one (exit 3).
    if (base / model_path).parent.exists() or model_path.startswith((".", "/", "~")):
        data["model"]["path"] = resolve(model_path)
    for split in ("train", "eval"):
        for item in data["data"][split]:
            item["path"] = resolve(item["path"])
    if data["data"]["chat_template"]:
        data["data"]["chat_template"] = resolve(data["data"]["chat_template"])
    if data["model"].get("adapter"):
        data["model"]["adapter"] = resolve(data["model"]["adapter"])
    data["output"]["dir"] = resolve(data["output"]["dir"])
    if data["output"]["sign_key"] and not str(data["output"]["sign_key"]).lower().startswith("pkcs11:"):
        data["output"]["sign_key"] = resolve(data["output"]["sign_key"])  # an HSM key (RFC 7512 URI) is no path
    return Recipe.model_validate(data)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    parts = key.strip().split(".")
    target = raw
    for depth, part in enumerate(parts[:-1]):
        # An optional section left out or set to null is switched on, with its defaults, by setting a field in
        # it (as axolotl-style overrides do); validation then names any unknown field and the allowed ones.
        if target.get(part) is None and _fields_at(tuple(parts[:depth + 1])):
            target[part] = {}
        if not isinstance(target.get(part, {}), dict):
            raise RecipeError(f"--set {key}: '{part}' is not a section")
        target = target.setdefault(part, {})
    try:
        target[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}).") from None


def _line_map(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line, for error messages."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            loc = prefix + (key_node.value,)
            out[loc] = key_node.start_mark.line + 1
            out.update(_line_map(value_node, loc))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            out.update(_line_map(item, prefix + (i,)))
    return out


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (for 'did you mean')."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            inner = getattr(candidate, "__args__", (candidate,))
            found = [c for c in (candidate, *inner) if isinstance(c, type) and issubclass(c, BaseModel)]
            if found:
                model = found[0]
                break
        else:
            return []
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str, lines: dict) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        line = lines.get(loc) or next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        where = f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            msg = f"unknown key; did you mean '{close[0]}'?" if close else f"unknown key; valid keys: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            # a signing key's reference may hold a secret (a PIN); its error never repeats the value
            msg = f"{err['msg']}" if loc[:2] == ("output", "sign_key") else f"{err['msg']} (got {shown})"
        problems.append(f"{where}: {dotted}: {msg}")
    return "invalid recipe:\n  " + "\n  ".join(problems)
