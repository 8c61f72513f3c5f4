"""The adapter export (`msov export RUN --adapter`): the PEFT adapter as trained, with its card, provenance and
signature, to `--out DIR` (signature `DIR.sig` beside) or as a registry version (signature inside)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UsageError
from ..events import EventSink, no_events
from .bom import write_bom
from .card import base_license, chat_template, copy_tokenizer, model_card
from .registry import ENTRY_IGNORE, REGISTRY_SIG, entry_folder, existing_entry, write_entry_name
from .source import base_digest, base_folder, load_run
from .stage import TargetExists, check_target, publish, staged


def export_adapter(run_path: Path, *, out: Path | None = None, registry: Path | None = None,
                   version: str | None = None, name: str | None = None, key: Path | None = None,
                   base: Path | None = None, include_paths: bool = False, overwrite: bool = False,
                   on_event: EventSink = no_events) -> dict:
    """`msov export RUN --adapter (--out DIR | --registry DIR --version V)`: the PEFT adapter with its card,
    provenance and signature. Its id is the folder's OMS subject digest (the signature's subject)."""
    from ..guard.paths import refuse_overlap
    from ..trust.hashing import DEFAULT_IGNORE, folder_digest
    from ..trust.keys import refuse_secrets
    from ..trust.signer import check_signer
    from ..trust.oms import sign_folder
    from ..trust.provenance import PROVENANCE_PATH, write_provenance

    # 1. where it goes: REGISTRY/<name>/<version>/ or --out; the key is loaded now, not after the work
    if (out is None) == (registry is None):
        raise UsageError("--adapter: pass either --out DIR or --registry DIR --version X.Y.Z.")
    run = load_run(run_path)
    name = name or run.name
    if registry is not None:
        target = entry_folder(registry, name, version)
    else:
        target = Path(out)
        check_target(target, overwrite)
    refuse_overlap(target, [run_path, base, run.base_path], what="--out")
    key_hint = check_signer(key, outside=(target,)) if key else None
    refuse_secrets(run.adapter_dir, key=key)

    with staged(target, sig_inside=REGISTRY_SIG if registry is not None else None) as stage:
        # 2. the adapter as trained (weights, config, its provenance), our card instead of PEFT's template
        on_event("stage", {"text": f"staging {target}"})
        for item in sorted(run.adapter_dir.rglob("*")):
            rel = item.relative_to(run.adapter_dir).as_posix()
            if item.is_file() and rel != "README.md":
                (stage.folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item, stage.folder / rel)
        if not (stage.folder / PROVENANCE_PATH).is_file():  # a run from before provenance, or a bare adapter
            write_provenance(stage.folder, run.record, run.recipe or None)
        tokenizer = []
        if chat_template(run.recipe):  # the run trained with another chat template
            tokenizer = copy_tokenizer(base_folder(run, base, need_weights=False).path, stage.folder, run.recipe)
        base_path = Path(str(base or run.base_path or run.adapter_config.get("base_model_name_or_path") or "?"))
        base_id = base_digest(run.base_files)
        facts = {"name": name, "version": version, "base model digest": f"`sha256:{base_id}`" if base_id else None,
                 "tokenizer": "included (the run used its own chat template)" if tokenizer else None}
        card = model_card(run, kind="adapter", base_ref=str(base_path) if include_paths else base_path.name,
                          license_=base_license(base_path) if base_path.is_dir() else None, facts=facts,
                          include_paths=include_paths)
        (stage.folder / "README.md").write_text(card)
        if registry is not None:  # signed with the rest: a copied or renamed version folder no longer verifies
            write_entry_name(stage.folder, name, version)
        # last, so that it lists every other file (the copied run's BOM is replaced); signed with them
        write_bom(stage.folder, name=name, version=version)
        digest = folder_digest(stage.folder, ignore=ENTRY_IGNORE if registry is not None else DEFAULT_IGNORE)

        # 3. a version is published once: the same bytes again is a no-op, anything else is refused
        if registry is not None and target.exists():
            return existing_entry(target, name, version, digest, base_id)
        if key:
            on_event("stage", {"text": "signing"})
        signed = sign_folder(stage.folder, key, sig_path=stage.sig) if key else None
        if registry is None:
            sig = publish(stage.folder, target, overwrite=overwrite, sig=stage.sig if signed else None,
                          sig_beside=True)
        else:
            sig = target / REGISTRY_SIG if signed else None
            try:
                publish(stage.folder, target, overwrite=False)
            except TargetExists:  # another export published this version between our check and now
                return existing_entry(target, name, version, digest, base_id)
    return {"status": "published", "name": name, "version": version, "path": str(target), "adapter_id": digest,
            "sig": str(sig) if sig else None, "key_hint": key_hint, "base_model_digest": base_id,
            "tokenizer_files": tokenizer}
