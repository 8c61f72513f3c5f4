"""What went into an output: an in-toto Statement with a SLSA v1 provenance predicate, kept inside the output
folder (`msov/provenance.json`) so that the folder's one signature covers it.

The subject is the weight files with their sha256; the predicate records the base model files, the files of the
adapter training started from (model.adapter) and the data files with their digests (resolvedDependencies), the
resolved recipe and its digest and the seed (externalParameters), the library versions (builder.version), the
machine (internalParameters), start and finish times (metadata), the final metrics, the training compute and the
controls that ran (byproducts: metrics, compute, controls). It is built from the run's record (record.RunRecord, what
run.json holds).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from urllib.parse import unquote

from pydantic import BaseModel

from ..errors import InputError, MsovError
from ..record import RunRecord
from .hashing import hash_files, list_files, write_atomic

PROVENANCE_PATH = "msov/provenance.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:msov:finetune:v1"
BUILDER_ID = "urn:msov:builder:local"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def write_provenance(folder: Path, record: RunRecord | None, recipe: dict | None, *,
                     weight_digests: dict[str, str] | None = None, export: dict | None = None) -> Path:
    """Write FOLDER/msov/provenance.json (atomically) from the run's record and its resolved recipe.

    `record` is None for a bare PEFT adapter (only what the export knows is recorded). `weight_digests`
    ({relative name: sha256}) spares hashing the weights again when the caller has them. `export` (how an export
    made the weights: what was merged, into which base, in which dtype) is recorded as externalParameters.export.
    """
    folder = Path(folder)
    if weight_digests is None:
        weight_digests = _hash_weights(folder)
    if not weight_digests:
        raise InputError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to describe in provenance.")
    return write_statement(folder, build_statement(record, recipe, weight_digests, export))


def build_statement(record: RunRecord | None, recipe: dict | None, weight_digests: dict[str, str],
                    export: dict | None = None) -> dict:
    """The in-toto Statement for weights made by the run `record` describes (None: a bare adapter, no run)."""
    base = record.base_model if record else None
    versions = record.versions if record else {}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(weight_digests.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": recipe,
                    "recipe_digest": record.recipe_digest if record else None,
                    "seed": record.seed if record else None,
                    "name": record.name if record else None,
                    "base_model": {"path": base.path if base else None,
                                   "architecture": base.architecture if base else None},
                    **({"export": export} if export is not None else {}),
                },
                "internalParameters": {
                    "python": versions.get("python", platform.python_version()),
                    "platform": versions.get("platform", platform.platform()),
                    "hardware": hardware(),
                    "data_scan": _json(record.data.scan) if record else None,
                },
                "resolvedDependencies": _dependencies(record),
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {k: v for k, v in versions.items() if v is not None}},
                "metadata": {"invocationId": record.name if record else None,
                             "startedOn": record.started_at if record else None,
                             "finishedOn": record.finished_at if record else None},
                "byproducts": [{"name": "metrics", "annotations": {
                    "train": _json(record.train) if record else None,
                    "eval": _json(record.eval) if record else None,
                    "tokens": _json(record.tokens) if record else None,
                    "parameters": _json(record.parameters) if record else None}},
                    *_evidence(record)],
            },
        },
    }


def _json(part: BaseModel) -> dict:
    """A part of the record as run.json holds it (every field, defaults included): the statement's bytes then do
    not depend on how the record was built."""
    return part.model_dump(mode="json", by_alias=True)


def _evidence(record: RunRecord | None) -> list[dict]:
    """The compute spent and the controls that ran, as byproducts; absent for a record that predates them."""
    if record is None:
        return []
    return [{"name": name, "annotations": _json(part)}
            for name, part in (("compute", record.compute), ("controls", record.controls)) if part is not None]


def write_statement(folder: Path, statement: dict) -> Path:
    target = Path(folder) / PROVENANCE_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, (json.dumps(statement, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return target


def sealed_claims(statement: dict) -> dict:
    """The training claims of a statement: what an export may only copy from the training run's own record."""
    build = (statement.get("predicate") or {}).get("buildDefinition") or {}
    external = build.get("externalParameters") or {}
    return {"recipe_digest": external.get("recipe_digest"), "seed": external.get("seed"),
            "resolvedDependencies": build.get("resolvedDependencies"),
            "byproducts": ((statement.get("predicate") or {}).get("runDetails") or {}).get("byproducts")}


def read_provenance(folder: Path) -> dict | None:
    """The provenance statement of an output folder, or None when it has none."""
    path = Path(folder) / PROVENANCE_PATH
    return parse_provenance(path.read_bytes(), path) if path.is_file() else None


def parse_provenance(data: bytes, path: Path, *, error: type[MsovError] = InputError) -> dict:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc}).") from None
    except RecursionError:
        raise error(f"{path}: not valid provenance (JSON nested too deeply).") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE or doc.get("predicateType") != PREDICATE_TYPE:
        raise error(f"{path}: not an in-toto Statement with predicateType {PREDICATE_TYPE}.")
    return doc


def check_provenance(doc: dict, signed: dict[str, str]) -> list[str]:
    """Problems between the provenance's subject and the signed files ({name: sha256}); empty when they agree."""
    problems = []
    for subject in doc.get("subject") or []:
        name, digest = subject.get("name"), (subject.get("digest") or {}).get("sha256")
        if name not in signed:
            problems.append(f"names weight file {name}, which the signature does not list")
        elif signed[name] != digest:
            problems.append(f"records sha256 {str(digest)[:12]}… for {name}, but the signed file is "
                            f"{signed[name][:12]}…")
    if not doc.get("subject"):
        problems.append("has no subject")
    return problems


def explain(doc: dict) -> dict:
    """The provenance flattened for a person: base model, datasets, recipe, versions, machine, times, metrics."""
    predicate = doc.get("predicate") or {}
    build, run = predicate.get("buildDefinition") or {}, predicate.get("runDetails") or {}
    external, internal = build.get("externalParameters") or {}, build.get("internalParameters") or {}
    deps = build.get("resolvedDependencies") or []
    role = lambda d: (d.get("annotations") or {}).get("role")  # noqa: E731 - a one-line lookup
    byproducts = {b.get("name"): b.get("annotations") for b in run.get("byproducts") or [] if isinstance(b, dict)}
    metrics = byproducts.get("metrics")
    return {
        "weights": [{"name": s.get("name"), "sha256": (s.get("digest") or {}).get("sha256")}
                    for s in doc.get("subject") or []],
        "base_model": {**(external.get("base_model") or {}),
                       "files": [{"name": d["name"].split("/", 1)[-1], "sha256": d["digest"]["sha256"]}
                                 for d in deps if role(d) == "base_model"]},
        # the adapter training started from (model.adapter): its files by path and digest; [] for a fresh adapter
        "start_adapter": [{"path": unquote(d.get("uri", "").removeprefix("file://")), "sha256": d["digest"]["sha256"]}
                          for d in deps if role(d) == "start_adapter"],
        "datasets": [{"path": unquote(d.get("uri", "").removeprefix("file://")), "sha256": d["digest"]["sha256"],
                      **{k: v for k, v in (d.get("annotations") or {}).items() if k != "role"}}
                     for d in deps if role(d) == "dataset"],
        "recipe_digest": external.get("recipe_digest"),
        "recipe_name": external.get("name"),
        "seed": external.get("seed"),
        "versions": (run.get("builder") or {}).get("version") or {},
        "hardware": internal.get("hardware"),
        "started": (run.get("metadata") or {}).get("startedOn"),
        "finished": (run.get("metadata") or {}).get("finishedOn"),
        "metrics": metrics or {},
        "compute": byproducts.get("compute"),  # None in provenance written before they were recorded
        "controls": byproducts.get("controls"),
        "export": external.get("export"),
    }


def hardware() -> dict:
    """The machine, described without importing torch: accelerators are named only when torch is already loaded
    (the run that trained imported it; `msov sign` on a laptop should not pay for importing it)."""
    info = {"machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["accelerators"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _dependencies(record: RunRecord | None) -> list[dict]:
    """in-toto ResourceDescriptors of every input file: base model files, the start adapter's files (model.adapter),
    then each dataset file."""
    if record is None:
        return []
    deps = []
    base_path = record.base_model.path
    for name, digest in sorted(record.base_model.files.items()):
        deps.append({"name": f"base_model/{name}", "uri": _uri(Path(base_path) / name) if base_path else None,
                     "digest": {"sha256": digest}, "annotations": {"role": "base_model"}})
    start = record.start_adapter
    for name, digest in sorted(start.files.items()) if start else ():
        deps.append({"name": f"start_adapter/{name}", "uri": _uri(Path(start.path) / name),
                     "digest": {"sha256": digest}, "annotations": {"role": "start_adapter"}})
    for split, files in (("train", record.data.train), ("eval", record.data.eval)):
        for item in files:
            deps.append({"name": f"data/{split}/{Path(item.path).name}", "uri": _uri(Path(item.path)),
                         "digest": {"sha256": item.sha256},
                         "annotations": {"role": "dataset", "split": split, "rows": item.rows,
                                         "format": item.format}})
    return [{k: v for k, v in d.items() if v is not None} for d in deps]


def _hash_weights(folder: Path) -> dict[str, str]:
    files = [f for f in list_files(folder, ignore=()) if f.name.endswith(WEIGHT_SUFFIXES)
             and not f.name.startswith("msov/")]
    return dict(zip((f.name for f in files), hash_files([f.path for f in files])))


def _uri(path: Path) -> str:
    return path.absolute().as_uri()


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
