"""Export: the run an export starts from, and the merged-model export job (`msov export RUN --merge`).

The job checks everything first (run, adapter, base, target, key), has `merge.merge_into` stream the merged
weights into a stage beside the target, adds what makes the folder a loadable model (config, tokenizer), its
provenance and card, signs it, and renames it into place: a crashed export leaves nothing that verifies.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, ModelFolderError, UsageError
from ..events import EventSink, no_events
from .stream_merge import check_adapter_config, merge_into, parse_size, read_json, weight_files

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tekken.json", "chat_template.jinja",
                   "chat_template.json")


# --- the run an export starts from ---------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    adapter_dir: Path
    summary: dict = field(default_factory=dict)  # run.json ({} for a bare adapter folder)
    recipe: dict = field(default_factory=dict)  # recipe.yaml, resolved
    adapter_config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.summary.get("name") or self.recipe.get("name") or self.path.name

    def provenance_input(self) -> dict:
        """What provenance.write_provenance wants: run.json plus the resolved recipe."""
        return {**self.summary, "recipe": self.recipe or None}


def load_run(path: Path) -> Run:
    """A finished run folder (adapter/, run.json, recipe.yaml) or a bare PEFT adapter folder."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        hint = "An unfinished run lives in RUN.partial/ until it is done." if path.with_name(
            path.name + ".partial").is_dir() else None
        raise InputError(f"{path}: no such run folder.", hint=hint)
    adapter_dir = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: neither a run folder (adapter/adapter_config.json) nor an adapter folder "
                         f"(adapter_config.json).", hint="Pass the folder `msov finetune` wrote (output.dir).")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InputError(f"{adapter_dir}: no adapter_model.safetensors (msov exports safetensors adapters only).")
    for item in (path / "run.json", path / "recipe.yaml"):
        if item.is_symlink():
            raise InputError(f"{item}: is a symbolic link; msov reads a run's own record only.")
    run = Run(path=path, adapter_dir=adapter_dir, adapter_config=read_json(config_file))
    if (path / "run.json").is_file():
        run.summary = read_json(path / "run.json")
    if (path / "recipe.yaml").is_file():
        run.recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    return run


def base_folder(run: Run, override: Path | None = None, *, need_weights: bool = True):
    """The base model folder the adapter was trained on: --base, else run.json, else adapter_config.json."""
    from ..guard.env import require_local_model
    from ..model.load import inspect_model_folder

    ref = override or (run.summary.get("base_model") or {}).get("path") \
        or run.adapter_config.get("base_model_name_or_path")
    if not ref:
        raise InputError(f"{run.path}: the run names no base model folder.", hint="Pass --base MODEL_DIR.")
    require_local_model(ref, field="base model (--base, or run.json base_model.path)")
    return inspect_model_folder(str(ref), need_weights=need_weights)


def check_base_unchanged(folder, run: Run, names: list[str]) -> None:
    """The base files the export reads must be the files the run trained on (run.json's sha256 of each)."""
    from ..trust.hashing import hash_files

    recorded = (run.summary.get("base_model") or {}).get("files") or {}
    if not recorded:
        return  # a bare adapter folder: nothing to compare with (the provenance says so)
    missing = [n for n in names if n not in recorded]
    actual = dict(zip(names, hash_files([folder.path / n for n in names])))
    changed = [n for n in names if n in recorded and recorded[n] != actual[n]]
    if missing or changed:
        what = "; ".join(filter(None, [f"changed since training: {', '.join(changed)}" if changed else "",
                                       f"not in the base the run used: {', '.join(missing)}" if missing else ""]))
        raise ModelFolderError(f"{folder.path}: is not the base model the run trained on ({what}).",
                               hint="Point --base at the exact folder the run used (run.json: base_model.files).")


def base_digest(files: dict[str, str]) -> str | None:
    """The base model's OMS subject digest, from {relative name: sha256} (run.json base_model.files)."""
    from ..trust.hashing import sort_key, subject_digest

    return subject_digest(files[n] for n in sorted(files, key=sort_key)) if files else None


def training_seal(run: Run) -> tuple[dict | None, dict | None]:
    """The training run's own record (ADAPTER/msov/provenance.json, written at training time, bound to the adapter
    weights by their digests and covered by adapter.sig when the run was signed) and how it was sealed. run.json
    is only a copy: one whose training claims differ from the record is refused (exit 4)."""
    import hashlib

    from ..errors import VerificationError
    from ..trust.hashing import hash_files
    from ..trust.provenance import PROVENANCE_PATH, build_statement, check_provenance, parse_provenance, sealed_claims

    record = run.adapter_dir / PROVENANCE_PATH
    if not record.is_file():
        if run.summary:
            raise VerificationError(f"{record}: missing; the run's claims (run.json) are not sealed by training.")
        return None, None
    data = record.read_bytes()
    trained = parse_provenance(data, record, error=VerificationError)
    weights = {s.get("name"): None for s in trained.get("subject") or []}
    on_disk = dict(zip(weights, hash_files([run.adapter_dir / str(n) for n in weights]))) \
        if all((run.adapter_dir / str(n)).is_file() for n in weights) else {}
    problems = check_provenance(trained, on_disk)
    if problems:
        raise VerificationError(f"{record}: " + "; ".join(problems) + " (the adapter is not the one training "
                                f"sealed).")
    if run.summary and sealed_claims(build_statement(run.provenance_input(), on_disk)) != sealed_claims(trained):
        raise VerificationError(f"{run.path / 'run.json'}: its training claims (datasets, base model files, recipe "
                                f"digest, seed or metrics) differ from what training sealed in {record}.",
                                hint="run.json was edited after training; export from an untouched run folder.")
    sig = run.path / "adapter.sig"
    signed = (run.summary.get("signature") or {}).get("key_hint") if sig.is_file() else None
    return trained, {"record": PROVENANCE_PATH, "record_sha256": hashlib.sha256(data).hexdigest(),
                     "signed_at_training": bool(signed), "training_key_hint": signed}


# --- the merged export ---------------------------------------------------------------------------------------

def export_merged(run_path: Path, out: Path, *, dtype: str | None = None, shard_size: str | int = "5GB",
                  key: Path | None = None, base: Path | None = None, include_paths: bool = False,
                  overwrite: bool = False, on_event: EventSink = no_events, fmt: str = "hf") -> dict:
    """`msov export RUN --merge --out OUT`: base + adapter as one standard Hugging Face folder (signed: OUT.sig)."""
    from ..trust.keys import check_signing_key, refuse_secrets
    from ..trust.oms import sign_folder
    from ..trust.provenance import write_provenance, write_statement
    from .registry import base_license, copy_tokenizer, folder_digest, model_card
    from .stage import check_target, publish, staged

    started = time.monotonic()
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}.")
    size, out = parse_size(shard_size), Path(out)

    # 1. the run, its adapter, the base it was trained on, the target and the key: all checked before any work
    run = load_run(run_path)
    config = check_adapter_config(run.adapter_config, run.adapter_dir / "adapter_config.json")
    folder = base_folder(run, base)
    quantized = folder.config.get("quantization_config")
    if quantized:
        raise ModelFolderError(
            f"{folder.path}/config.json: the base weights are stored quantized ({quantized.get('quant_method')}); "
            f"msov merges into full-precision weights only, never into dequantized ones.",
            hint="Point --base at the full-precision release of the same model.")
    check_target(out, overwrite)
    from ..guard.paths import refuse_overlap

    refuse_overlap(out, [run_path, folder.path], what="--out")
    key_hint = check_signing_key(key, outside=(out,)) if key else None
    refuse_secrets(run.adapter_dir, key=key)

    # 2. the base files the merge reads are the files the run trained on
    on_event("stage", {"text": "checking the base model against the run"})
    used = ["config.json"] + [p.name for p in weight_files(folder.path)]
    if (folder.path / "model.safetensors.index.json").is_file():
        used.append("model.safetensors.index.json")
    check_base_unchanged(folder, run, used)
    trained, seal = training_seal(run)

    with staged(out) as stage:
        # 3. the streamed merge
        on_event("stage", {"text": "merging (streamed, one tensor at a time)"})
        merged = merge_into(folder.path, run.adapter_dir, stage.folder, dtype=DTYPES.get(dtype), shard_size=size,
                            config=config, on_event=on_event)
        # 4. what makes it a loadable model folder: config, generation config, tokenizer
        model_config = dict(folder.config)
        if dtype:
            field_name = "torch_dtype" if "torch_dtype" in model_config and "dtype" not in model_config else "dtype"
            model_config[field_name] = _CONFIG_DTYPE[DTYPES[dtype]]
        (stage.folder / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        if (folder.path / "generation_config.json").is_file():
            shutil.copyfile(folder.path / "generation_config.json", stage.folder / "generation_config.json")
        copy_tokenizer(folder.path, stage.folder, run.recipe)
        if fmt == "mistral":  # the same merged weights in Mistral's native layout (mistral-inference, vLLM)
            from ..model.mistral_native import native_layout

            merged["files"] = native_layout(stage.folder, model_config, folder.path)

        # 5. provenance (what went in, and how it was merged) and the card
        quant = run.recipe.get("quantization")
        adapter_id = run.summary.get("adapter_digest") or folder_digest(run.adapter_dir)
        base_files = (run.summary.get("base_model") or {}).get("files") or {}
        facts = {
            "kind": "merged", "method": "streamed per tensor", "adapter_id": adapter_id,
            "base_model_digest": base_digest(base_files), "dtype": dtype or "as stored in the base",
            "merged_into": "full-precision base weights from the local base folder"
                           + (f"; the adapter was trained against a {quant.get('bits')}-bit "
                              f"{quant.get('quant_type')} quantization of them" if quant else ""),
            "trained_with_quantization": quant or None,
            "lora": {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")},
        }
        if trained is None:  # a bare adapter: only export-time facts, and the provenance says so
            write_provenance(stage.folder, run.provenance_input(), weight_digests=merged["files"], export=facts)
        else:  # every training claim copied from what training sealed, never from the editable run.json
            statement = json.loads(json.dumps(trained))
            statement["subject"] = [{"name": n, "digest": {"sha256": d}} for n, d in sorted(merged["files"].items())]
            statement["predicate"]["buildDefinition"]["externalParameters"]["export"] = {**facts, "training_seal": seal}
            write_statement(stage.folder, statement)
        base_id = facts["base_model_digest"]
        card_facts = {"adapter id": f"`sha256:{adapter_id}`", "dtype": facts["dtype"],
                      "base model digest": f"`sha256:{base_id}`" if base_id else None,
                      "merged into": facts["merged_into"]}
        card = model_card(run, kind="merged", base_ref=str(folder.path) if include_paths else folder.path.name,
                          license_=base_license(folder.path), facts=card_facts, include_paths=include_paths)
        (stage.folder / "README.md").write_text(card)
        # 6. the signature, made before anything is renamed into place (the shards are not read again: the merge
        #    hashed every byte it wrote; `msov verify` re-hashes them all); then the rename
        if key:
            on_event("stage", {"text": "signing"})
            digest = sign_folder(stage.folder, key, sig_path=stage.sig, known=merged["files"])["subject_digest"]
        else:
            digest = folder_digest(stage.folder, known=merged["files"])
        sig = publish(stage.folder, out, overwrite=overwrite, sig=stage.sig if key else None, sig_beside=True)
    return {"status": "ok", "kind": "merged", "out": str(out), "sig": str(sig) if sig else None,
            "key_hint": key_hint, "subject_digest": digest, "adapter_id": adapter_id,
            "base_model": {"path": str(folder.path), "digest": facts["base_model_digest"]},
            "files": sorted(merged["files"]), "tensors": merged["tensors"], "merged_tensors": merged["merged"],
            "total_size": merged["total_size"], "dtype": facts["dtype"], "merged_into": facts["merged_into"],
            "wall_time_s": round(time.monotonic() - started, 2)}
