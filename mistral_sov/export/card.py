"""What makes an export readable without msov: its model card (README.md with Hugging Face card metadata), the
base model's license, and the tokenizer files a run with its own chat template needs beside its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..record import read_json
from .source import Run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tekken.json", "chat_template.jinja",
                   "chat_template.json")


def copy_tokenizer(base: Path, out: Path, recipe: dict) -> list[str]:
    """The base tokenizer's files; the recipe's chat template (data.chat_template) replaces the base's."""
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    template = chat_template(recipe)
    if template:
        shutil.copyfile(template, out / "chat_template.jinja")
        config_file = out / "tokenizer_config.json"
        if config_file.is_file():  # one template only: the .jinja file, not an older one inline
            config = read_json(config_file)
            if config.pop("chat_template", None) is not None:
                config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        copied = sorted(set(copied) | {"chat_template.jinja"})
    return copied


def chat_template(recipe: dict) -> str | None:
    """The run's own chat template file (recipe.yaml data.chat_template), when it trained with one."""
    data = recipe.get("data")
    return data.get("chat_template") if isinstance(data, dict) else None


def base_license(base: Path) -> str | None:
    """The license named in the base model's own card (its YAML front matter), when it has one."""
    import yaml

    card = base / "README.md"
    if not card.is_file():
        return None
    parts = card.read_text(encoding="utf-8", errors="replace").split("---", 2)
    if len(parts) < 3 or parts[0].strip():
        return None
    try:
        meta = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError:
        return None
    return str(meta["license"]) if isinstance(meta, dict) and meta.get("license") else None


def model_card(run: Run, *, kind: str, base_ref: str, license_: str | None, facts: dict,
               include_paths: bool = False) -> str:
    """README.md with Hugging Face card metadata; datasets by digest, and no local paths unless asked."""
    import yaml

    record = run.record
    files = record.data.train + record.data.eval if record else []
    method = training_method(run.recipe)
    meta = {"base_model": base_ref, "library_name": "peft" if kind == "adapter" else "transformers",
            "pipeline_tag": "text-generation", "tags": ["msov", "lora", kind] + ([method] if method != "sft" else [])}
    if license_:
        meta["license"] = license_
    if files:
        meta["datasets"] = [f"sha256:{f.sha256}" for f in files]
    evals = record.eval if record else None
    before = evals.before.loss if evals and evals.before else None
    after = evals.after.loss if evals and evals.after else None
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {run.name} ({'LoRA adapter' if kind == 'adapter' else 'merged checkpoint'})", "",
             f"Fine-tuned with msov from `{base_ref}`. Loads with plain "
             f"{'`peft`' if kind == 'adapter' else '`transformers`'}; msov is not needed.", "", "```python"]
    if kind == "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
                  'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")']
    lines += ["```", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items() if v is not None]
    lines += _method_rows(run.recipe, method, record)
    if record:
        lines.append(f"| training | {record.train.steps} steps, final loss {_loss(record.train.final_loss)} |")
    if before is not None or after is not None:
        lines.append(f"| held-out loss | {_loss(before)} → {_loss(after)} |")
    if files:
        lines += ["", "## Data", "", "| sha256 | format | rows |" + (" path |" if include_paths else ""),
                  "|---|---|---|" + ("---|" if include_paths else "")]
        lines += [f"| `{f.sha256}` | {f.format} | {f.rows} |" + (f" {f.path} |" if include_paths else "")
                  for f in files]
    lines += ["", "What went into it, with digests: `msov/provenance.json` (covered by the signature).", ""]
    return "\n".join(lines)


def training_method(recipe: dict) -> str:
    """sft, dpo or orpo: the run's train.method (recipe.yaml); sft for a bare adapter or a recipe without it."""
    train = recipe.get("train") if isinstance(recipe, dict) else None
    return str(train.get("method") or "sft") if isinstance(train, dict) else "sft"


def _method_rows(recipe: dict, method: str, record) -> list[str]:
    """The card's rows on how the adapter was trained: the method and its settings, the preference data by digest
    (DPO, ORPO), and the adapter training started from (model.adapter), by digest."""
    train = recipe.get("train") or {} if isinstance(recipe, dict) else {}
    rows = []
    if method == "dpo":
        rows.append(f"| training method | DPO ({train.get('loss_type', 'sigmoid')} loss, beta {train.get('beta')}, "
                    f"label smoothing {train.get('label_smoothing', 0.0)}; reference: "
                    f"{'the start adapter' if (recipe.get('model') or {}).get('adapter') else 'the base model'}) |")
    elif method == "orpo":
        rows.append(f"| training method | ORPO (beta {train.get('beta')}; no reference model) |")
    else:
        rows.append("| training method | SFT (supervised fine-tuning) |")
    if method != "sft" and record:
        rows += [f"| preference data | `sha256:{f.sha256}` ({f.rows} pairs, {split}) |"
                 for split, files in (("train", record.data.train), ("held out", record.data.eval)) for f in files]
    start = record.start_adapter if record else None
    if start:
        rows.append(f"| started from | LoRA adapter, adapter_model.safetensors "
                    f"`sha256:{start.files.get('adapter_model.safetensors')}` |")
    return rows


def _loss(value: float | None) -> str:
    """A loss as the card prints it (the card is a file, not the screen: cli/show's formatters are not for it)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
