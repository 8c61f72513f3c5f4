"""The merged export (`msov export RUN --merge --out OUT`): base + adapter as one standard model folder.

The job checks everything first (run, adapter, base, target, key), has `stream_merge.merge_into` stream the merged
weights into a stage beside the target, adds what makes the folder a loadable model (config, tokenizer), its
provenance and card, signs it, and renames it into place: a crashed export leaves nothing that verifies.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import ModelFolderError, UsageError
from ..events import EventSink, no_events
from ..sizes import parse_size
from .bom import write_bom
from .card import base_license, copy_tokenizer, model_card
from .source import base_digest, base_folder, check_base_unchanged, load_run, training_seal
from .stage import check_target, publish, staged
from .stream_merge import check_adapter_config, merge_into, weight_files

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def export_merged(run_path: Path, out: Path, *, dtype: str | None = None, shard_size: str | int = "5GB",
                  key: Path | None = None, base: Path | None = None, include_paths: bool = False,
                  overwrite: bool = False, on_event: EventSink = no_events, fmt: str = "hf") -> dict:
    """`msov export RUN --merge --out OUT`: base + adapter as one standard Hugging Face folder (signed: OUT.sig)."""
    from ..trust.hashing import folder_digest
    from ..trust.keys import refuse_secrets
    from ..trust.signer import check_signer
    from ..trust.oms import sign_folder
    from ..trust.provenance import write_provenance, write_statement

    started = time.monotonic()
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}.")
    size, out = parse_size(shard_size, option="--shard-size"), Path(out)

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
    key_hint = check_signer(key, outside=(out,)) if key else None
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
        adapter_id = (run.record.adapter_digest if run.record else None) or folder_digest(run.adapter_dir)
        facts = {
            "kind": "merged", "method": "streamed per tensor", "adapter_id": adapter_id,
            "base_model_digest": base_digest(run.base_files), "dtype": dtype or "as stored in the base",
            "merged_into": "full-precision base weights from the local base folder"
                           + (f"; the adapter was trained against a {quant.get('bits')}-bit "
                              f"{quant.get('quant_type')} quantization of them" if quant else ""),
            "trained_with_quantization": quant or None,
            "lora": {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")},
        }
        if trained is None:  # a bare adapter: only export-time facts, and the provenance says so
            write_provenance(stage.folder, run.record, run.recipe or None, weight_digests=merged["files"], export=facts)
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
        # the ML-BOM last (it lists every other file; the shards by the digests the merge took as it wrote them)
        write_bom(stage.folder, known=merged["files"])
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
