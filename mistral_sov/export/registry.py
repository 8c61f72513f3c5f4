"""Publishing exports: a stage beside the target renamed into place (its signature with it), the model card,
versioned adapters in a registry folder (`DIR/<name>/<version>/`) and the registry's listing.

A registry entry carries its signature inside (`model.sig`, which the signature leaves out of what it covers), so
one rename publishes folder and signature together; `--out` exports keep msov's `OUT.sig` beside the folder.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

from ..errors import InputError, UsageError
from ..events import EventSink, no_events
from .merged import TOKENIZER_FILES, Run, base_digest, base_folder, load_run
from .stage import TargetExists, check_target, publish, staged  # noqa: F401 - check_target: re-exported until the split
from .stream_merge import read_json as _read_json

REGISTRY_SIG = "model.sig"
ENTRY_PATH = "msov/registry.json"  # the name and version an entry was published (and signed) as
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Semantic Versioning 2.0.0: MAJOR.MINOR.PATCH, optional -prerelease and +build.
_VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def export_adapter(run_path: Path, *, out: Path | None = None, registry: Path | None = None,
                   version: str | None = None, name: str | None = None, key: Path | None = None,
                   base: Path | None = None, include_paths: bool = False, overwrite: bool = False,
                   on_event: EventSink = no_events) -> dict:
    """`msov export RUN --adapter (--out DIR | --registry DIR --version V)`: the PEFT adapter with its card,
    provenance and signature. Its id is the folder's OMS subject digest (the signature's subject)."""
    from ..trust.hashing import DEFAULT_IGNORE
    from ..trust.keys import check_signing_key, refuse_secrets
    from ..trust.oms import sign_folder
    from ..trust.provenance import PROVENANCE_PATH, write_provenance

    # 1. where it goes: REGISTRY/<name>/<version>/ or --out; the key is loaded now, not after the work
    if (out is None) == (registry is None):
        raise UsageError("--adapter: pass either --out DIR or --registry DIR --version X.Y.Z.")
    run = load_run(run_path)
    name = name or run.name
    if registry is not None:
        if not version or not _VERSION.match(version):
            raise UsageError(f"--version {version!r}: expected a semantic version such as 1.4.0 "
                             f"(MAJOR.MINOR.PATCH).")
        if not _NAME.match(name):
            raise UsageError(f"--name {name!r}: letters, digits, '.', '_' and '-' only, starting with a letter or "
                             f"digit.")
        target = Path(registry) / name / version
    else:
        target = Path(out)
        check_target(target, overwrite)
    from ..guard.paths import refuse_overlap

    refuse_overlap(target, [run_path, base, (run.summary.get("base_model") or {}).get("path")], what="--out")
    key_hint = check_signing_key(key, outside=(target,)) if key else None
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
            write_provenance(stage.folder, run.provenance_input())
        tokenizer = []
        if (run.recipe.get("data") or {}).get("chat_template"):  # the run trained with another chat template
            tokenizer = copy_tokenizer(base_folder(run, base, need_weights=False).path, stage.folder, run.recipe)
        base_path = Path(str(base or (run.summary.get("base_model") or {}).get("path")
                             or run.adapter_config.get("base_model_name_or_path") or "?"))
        base_id = base_digest((run.summary.get("base_model") or {}).get("files") or {})
        facts = {"name": name, "version": version, "base model digest": f"`sha256:{base_id}`" if base_id else None,
                 "tokenizer": "included (the run used its own chat template)" if tokenizer else None}
        card = model_card(run, kind="adapter", base_ref=str(base_path) if include_paths else base_path.name,
                          license_=base_license(base_path) if base_path.is_dir() else None, facts=facts,
                          include_paths=include_paths)
        (stage.folder / "README.md").write_text(card)
        if registry is not None:  # signed with the rest: a copied or renamed version folder no longer verifies
            (stage.folder / ENTRY_PATH).parent.mkdir(parents=True, exist_ok=True)
            (stage.folder / ENTRY_PATH).write_text(json.dumps({"name": name, "version": version}) + "\n")
        ignore = (*DEFAULT_IGNORE, REGISTRY_SIG) if registry is not None else DEFAULT_IGNORE
        digest = folder_digest(stage.folder, ignore=ignore)

        # 3. a version is published once: the same bytes again is a no-op, anything else is refused
        if registry is not None and target.exists():
            return _existing(target, name, version, digest, base_id)
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
                return _existing(target, name, version, digest, base_id)
    return {"status": "published", "name": name, "version": version, "path": str(target), "adapter_id": digest,
            "sig": str(sig) if sig else None, "key_hint": key_hint, "base_model_digest": base_id,
            "tokenizer_files": tokenizer}


def _existing(target: Path, name: str, version: str | None, digest: str, base_id: str | None) -> dict:
    from ..trust.hashing import DEFAULT_IGNORE

    existing = folder_digest(target, ignore=(*DEFAULT_IGNORE, REGISTRY_SIG))
    if existing != digest:
        raise InputError(f"{target}: version {version} of {name} already exists with other content "
                         f"(sha256:{existing[:16]}… there, sha256:{digest[:16]}… now); a published version is never "
                         f"overwritten.", hint="Publish under a new --version.")
    sig = target / REGISTRY_SIG
    return {"status": "unchanged", "name": name, "version": version, "path": str(target), "adapter_id": digest,
            "sig": str(sig) if sig.is_file() else None, "key_hint": _bundle_facts(sig).get("key_hint"),
            "base_model_digest": base_id, "tokenizer_files": []}


def folder_digest(folder: Path, *, known: dict[str, str] | None = None, ignore=None) -> str:
    """OMS subject digest of a folder (what its signature's subject would be); `known` digests are not re-hashed."""
    from ..trust.hashing import DEFAULT_IGNORE, hash_files, list_files, subject_digest

    files = list_files(folder, ignore=DEFAULT_IGNORE if ignore is None else ignore)
    known = known or {}
    todo = [f for f in files if f.name not in known]
    hashed = dict(zip((f.name for f in todo), hash_files([f.path for f in todo])))
    return subject_digest(known[f.name] if f.name in known else hashed[f.name] for f in files)


def list_registry(registry: Path, *, pub: Path | None = None) -> list[dict]:
    """Every DIR/<name>/<version>/: digest (recomputed), base model digest, date, signer; with `pub`, each entry
    verified on its own, against the name and version it was signed as."""
    from ..errors import MsovError

    registry = Path(registry)
    if not registry.is_dir():
        raise InputError(f"{registry}: no such registry folder.")
    entries = []
    for config in registry.glob("*/*/adapter_config.json"):
        folder = config.parent
        try:
            entries.append(_entry(folder, pub))
        except MsovError as exc:  # one bad entry is reported as such; the others are still listed
            entries.append({"name": folder.parent.name, "version": folder.name, "digest": None,
                            "base_model_digest": None, "date": None, "signed_by": None,
                            "status": f"FAILED: {exc.message}", "path": str(folder)})
    return sorted(entries, key=lambda e: (e["name"], _version_key(e["version"])))


def _entry(folder: Path, pub: Path | None) -> dict:
    from ..errors import MsovError
    from ..trust.hashing import DEFAULT_IGNORE
    from ..trust.oms import verify_folder
    from ..trust.provenance import explain, read_provenance

    digest = folder_digest(folder, ignore=(*DEFAULT_IGNORE, REGISTRY_SIG))
    facts = explain(read_provenance(folder) or {})
    files = {f["name"]: f["sha256"] for f in facts["base_model"]["files"]}
    sig = folder / REGISTRY_SIG
    bundle = _bundle_facts(sig)
    if not sig.is_file():
        status = "unsigned"
    elif bundle.get("subject_digest") != digest:
        status = "MODIFIED after signing" if bundle.get("subject_digest") else "unreadable signature"
    elif pub is None:
        status = "signed, unchecked (pass --pub to verify)"
    else:
        try:
            status = _signed_as(folder, verify_folder(folder, pub, sig_path=sig)["subject"])
        except MsovError as exc:
            status = f"FAILED: {exc.message}"
    return {"name": folder.parent.name, "version": folder.name, "digest": digest,
            "base_model_digest": base_digest(files), "date": facts.get("finished"),
            "signed_by": bundle.get("key_hint"), "status": status, "path": str(folder)}


def _signed_as(folder: Path, subject: str) -> str:
    """A verified entry is listed as verified only under the name and version it was signed as."""
    try:
        signed = json.loads((folder / ENTRY_PATH).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        signed = None
    signed = signed if isinstance(signed, dict) else {}
    listed = (folder.parent.name, folder.name)
    if (signed.get("name"), signed.get("version")) != listed or subject != folder.name:
        return (f"FAILED: signed as {signed.get('name', '?')} {signed.get('version', subject)}, listed as "
                f"{listed[0]} {listed[1]} (a copied or renamed entry)")
    return "verified"


def _version_key(version: str) -> tuple:
    match = _VERSION.match(version)
    if not match:
        return (1, version)
    # A pre-release sorts before its release (1.0.0-rc.1 < 1.0.0).
    return (0, *map(int, match.groups()[:3]), match.group(4) is None, match.group(4) or "")


def _bundle_facts(sig: Path) -> dict:
    """Key hint and subject digest a signature claims (nothing is verified here)."""
    try:
        bundle = json.loads(sig.read_bytes())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        return {"key_hint": bundle["verificationMaterial"]["publicKey"]["hint"],
                "subject_digest": statement["subject"][0]["digest"]["sha256"]}
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError):
        return {}


def copy_tokenizer(base: Path, out: Path, recipe: dict) -> list[str]:
    """The base tokenizer's files; the recipe's chat template (data.chat_template) replaces the base's."""
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
            copied.append(name)
    template = (recipe.get("data") or {}).get("chat_template")
    if template:
        shutil.copyfile(template, out / "chat_template.jinja")
        config_file = out / "tokenizer_config.json"
        if config_file.is_file():  # one template only: the .jinja file, not an older one inline
            config = _read_json(config_file)
            if config.pop("chat_template", None) is not None:
                config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        copied = sorted(set(copied) | {"chat_template.jinja"})
    return copied


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

    data = run.summary.get("data") or {}
    files = [f for split in ("train", "eval") for f in data.get(split) or []]
    meta = {"base_model": base_ref, "library_name": "peft" if kind == "adapter" else "transformers",
            "pipeline_tag": "text-generation", "tags": ["msov", "lora", kind]}
    if license_:
        meta["license"] = license_
    if files:
        meta["datasets"] = [f"sha256:{f['sha256']}" for f in files]
    train, evaluation = run.summary.get("train") or {}, run.summary.get("eval") or {}
    before, after = (evaluation.get("before") or {}).get("loss"), (evaluation.get("after") or {}).get("loss")
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
    if train.get("steps") is not None:
        lines.append(f"| training | {train['steps']} steps, final loss {_fmt(train.get('final_loss'))} |")
    if before is not None or after is not None:
        lines.append(f"| held-out loss | {_fmt(before)} → {_fmt(after)} |")
    if files:
        lines += ["", "## Data", "", "| sha256 | format | rows |" + (" path |" if include_paths else ""),
                  "|---|---|---|" + ("---|" if include_paths else "")]
        lines += [f"| `{f['sha256']}` | {f.get('format')} | {f.get('rows')} |"
                  + (f" {f['path']} |" if include_paths else "") for f in files]
    lines += ["", "What went into it, with digests: `msov/provenance.json` (covered by the signature).", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


