"""model.adapter: the LoRA adapter a run starts from, checked before any weights load (the loading itself is
`load.attach_lora`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..recipe import LoraSection
from .load import PICKLE_SUFFIXES, check_safetensors_headers

START_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what training reads of model.adapter
# The fields of adapter_config.json that fix the adapter's shape and scaling, with the recipe's lora field for each.
_LORA_FIELDS = (("r", "r"), ("lora_alpha", "alpha"), ("use_rslora", "use_rslora"), ("use_dora", "use_dora"),
                ("bias", "bias"))


def inspect_start_adapter(ref: str, section: LoraSection, *, architecture: str | None = None) -> Path:
    """model.adapter checked before any weights load: a folder of its own regular files (no symbolic links),
    safetensors weights, a LoRA config for a causal LM that the recipe's lora section describes (the recipe must
    agree with the adapter: it is recorded as the run's configuration), and, where the adapter carries msov's
    provenance, trained on a base of the same architecture. Returns the folder."""
    from ..record import read_json

    path = Path(ref)
    where = f"model.adapter: '{ref}'"
    if path.is_symlink():
        raise InputError(f"{where} is a symbolic link; msov trains from an adapter folder's own files only.",
                         hint="Point model.adapter at the folder itself (a link can change without the run knowing).")
    if not path.is_dir():
        raise InputError(f"{where} is not a folder.", hint="Point it at an adapter folder, e.g. RUN/adapter.")
    if not (path / "adapter_config.json").exists() and (path / "adapter" / "adapter_config.json").is_file():
        raise InputError(f"{where} is a run folder, not an adapter folder.", hint=f"Use {path / 'adapter'}.")
    for name in START_ADAPTER_FILES:
        item = path / name
        if item.is_symlink():
            raise InputError(f"{where}: {name} is a symbolic link; msov reads an adapter folder's own files only.")
        if not item.is_file():
            pickled = [p.name for p in path.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES]
            if name.endswith(".safetensors") and pickled:
                raise InputError(f"{where}: the adapter weights are a pickle file ({pickled[0]}); msov loads "
                                 "safetensors only, because unpickling can run arbitrary code.",
                                 hint="Convert them to adapter_model.safetensors on a trusted machine.")
            raise InputError(f"{where}: no {name}.", hint="An adapter folder holds adapter_config.json and "
                             "adapter_model.safetensors (what `msov finetune` writes to RUN/adapter).")
    check_safetensors_headers([path / "adapter_model.safetensors"])
    config_file = path / "adapter_config.json"
    config = read_json(config_file)
    if config.get("peft_type") != "LORA" or config.get("task_type") not in (None, "CAUSAL_LM"):
        raise InputError(f"{config_file}: peft_type {config.get('peft_type')!r}, task_type "
                         f"{config.get('task_type')!r}; model.adapter must be a LoRA adapter for a causal LM.")
    for theirs, ours in _LORA_FIELDS:
        if config.get(theirs) != getattr(section, ours) and not (ours == "alpha" and config.get(theirs) is not None
                                                                 and float(config[theirs]) == float(section.alpha)):
            raise InputError(f"{config_file}: {theirs} is {config.get(theirs)!r}, but the recipe's lora.{ours} is "
                             f"{getattr(section, ours)!r}; the lora section must describe the adapter training "
                             "starts from.", hint=f"Set lora.{ours}: {config.get(theirs)!r} (the recipe.yaml of the "
                                                  "run that made the adapter has its whole lora section).")
    targets = config.get("target_modules")
    targets = {targets} if isinstance(targets, str) else set(targets or [])
    if section.target_modules != "all-linear" and targets != set(section.target_modules):
        raise InputError(f"{config_file}: target_modules is {sorted(targets)}, but the recipe's lora.target_modules "
                         f"is {sorted(section.target_modules)}; the lora section must describe the adapter training "
                         "starts from.", hint=f"Set lora.target_modules: {sorted(targets)}.")
    if architecture is not None:
        from ..trust.provenance import read_provenance

        trained = read_provenance(path)
        base = (((trained or {}).get("predicate") or {}).get("buildDefinition") or {}).get(
            "externalParameters", {}).get("base_model") or {}
        if base.get("architecture") and base["architecture"] != architecture:
            raise InputError(f"{where}: trained on a base model of architecture {base['architecture']} "
                             f"({path / 'msov' / 'provenance.json'}), but model.path is {architecture}.",
                             hint="Start from an adapter trained on this base model, or set model.path to its base.")
    return path
