"""The run an export starts from: its folder, its typed record (run.json), its recipe, and what training sealed.

A finished run folder (adapter/, run.json, recipe.yaml) or a bare PEFT adapter folder (no record). run.json is read
as a RunRecord once, here: an edited or foreign one that does not parse is refused before any work (exit 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, ModelFolderError
from ..record import RunRecord, read_json


@dataclass
class Run:
    path: Path
    adapter_dir: Path
    record: RunRecord | None = None  # run.json (None for a bare adapter folder)
    recipe: dict = field(default_factory=dict)  # recipe.yaml, resolved
    adapter_config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return (self.record.name if self.record else None) or self.recipe.get("name") or self.path.name

    @property
    def base_path(self) -> str | None:
        """The base model folder run.json names (None for a bare adapter)."""
        return self.record.base_model.path if self.record else None

    @property
    def base_files(self) -> dict[str, str]:
        """{relative name: sha256} of every base model file training read ({} for a bare adapter)."""
        return self.record.base_model.files if self.record else {}


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
        run.record = RunRecord.read(path / "run.json")
    if (path / "recipe.yaml").is_file():
        run.recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    return run


def base_folder(run: Run, override: Path | None = None, *, need_weights: bool = True):
    """The base model folder the adapter was trained on: --base, else run.json, else adapter_config.json."""
    from ..guard.local import require_local_model
    from ..model.load import inspect_model_folder

    ref = override or run.base_path or run.adapter_config.get("base_model_name_or_path")
    if not ref:
        raise InputError(f"{run.path}: the run names no base model folder.", hint="Pass --base MODEL_DIR.")
    require_local_model(ref, field="base model (--base, or run.json base_model.path)")
    return inspect_model_folder(str(ref), need_weights=need_weights)


def check_base_unchanged(folder, run: Run, names: list[str]) -> None:
    """The base files the export reads must be the files the run trained on (run.json's sha256 of each)."""
    from ..trust.hashing import hash_files

    recorded = run.base_files
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

    sealed = run.adapter_dir / PROVENANCE_PATH
    if not sealed.is_file():
        if run.record:
            raise VerificationError(f"{sealed}: missing; the run's claims (run.json) are not sealed by training.")
        return None, None
    data = sealed.read_bytes()
    trained = parse_provenance(data, sealed, error=VerificationError)
    weights = {s.get("name"): None for s in trained.get("subject") or []}
    on_disk = dict(zip(weights, hash_files([run.adapter_dir / str(n) for n in weights]))) \
        if all((run.adapter_dir / str(n)).is_file() for n in weights) else {}
    problems = check_provenance(trained, on_disk)
    if problems:
        raise VerificationError(f"{sealed}: " + "; ".join(problems) + " (the adapter is not the one training "
                                "sealed).")
    if run.record and sealed_claims(build_statement(run.record, run.recipe or None, on_disk)) \
            != sealed_claims(trained):
        raise VerificationError(f"{run.path / 'run.json'}: its training claims (datasets, base model files, recipe "
                                f"digest, seed or metrics) differ from what training sealed in {sealed}.",
                                hint="run.json was edited after training; export from an untouched run folder.")
    signature = run.record.signature if run.record else None
    signed = signature.key_hint if signature and (run.path / "adapter.sig").is_file() else None
    return trained, {"record": PROVENANCE_PATH, "record_sha256": hashlib.sha256(data).hexdigest(),
                     "signed_at_training": bool(signed), "training_key_hint": signed}
