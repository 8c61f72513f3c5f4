"""The CycloneDX 1.6 ML-BOM (`bom.cdx.json`) written into every signed output, so that its one signature covers it.

Built from the provenance msov has just written into the folder (the facts of the run: base model files, datasets,
recipe, versions, metrics) and from the folder's own files. It says the same as the provenance, in the form an
auditor's SBOM tooling (Dependency-Track and the like) reads:

- metadata.component: the fine-tuned model (`machine-learning-model`) with its model card; every file of the folder
  is a nested `file` component with its sha256 (CycloneDX's way to say "made of these files": one component's
  `hashes` are alternative digests of one artifact, not a list of files). bom.cdx.json cannot list itself, and the
  signature, made after it, cannot be listed either: the signature's manifest is what covers both.
- components: the base model (`machine-learning-model`, its every file nested with its sha256), each dataset file
  (`data`), the libraries of the run (`library`, pkg:pypi purls).
- dependencies: the model depends on its base model and on the libraries. A dependency edge rather than
  `pedigree.ancestors`: the base stays a top-level component that tooling lists and the graph can name (an ancestor
  is nested inside the model and the dependency graph cannot point at it), and a LoRA adapter does need its base to
  run; the `msov:base_model` property says the edge means "fine-tuned from".

cyclonedx-python-lib (11.x) has no model for `modelCard` nor for a component's `data` yet (its issues #912 and
#913): the library builds and checks everything else, and those two schema objects are added to its JSON output;
the tests validate the whole document with the library's strict 1.6 schema validator.

The same folder gives the same bytes: the timestamp is the run's finish time, the serial number is derived from the
weights' digests, components are sorted, keys are sorted. A registry re-publish of the same run stays a no-op.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from pathlib import Path

from ..errors import InputError
from ..trust.hashing import DEFAULT_IGNORE, hash_files, list_files, sort_key, subject_digest, write_atomic
from ..trust.provenance import PROVENANCE_PATH, explain, read_provenance

BOM_PATH = "bom.cdx.json"
MODEL_REF = "model"
BASE_REF = "base-model"
# Libraries that go into the BOM as pypi components; python and platform are properties, not packages.
NOT_PACKAGES = ("python", "platform")
_SERIAL_NAMESPACE = uuid.UUID("6d736f76-626f-4d00-8000-6d6c2d626f6d")  # msov's own namespace for uuid5 serials


def write_bom(folder: Path, provenance: dict | None = None, *, name: str | None = None, version: str | None = None,
              known: dict[str, str] | None = None) -> Path:
    """Write FOLDER/bom.cdx.json (atomically) from the provenance inside the folder (or `provenance`) and the
    folder's files. `name` and `version` name the model (a registry entry's); by default the run's name.
    `known` ({relative name: sha256}) spares re-reading files the caller hashed as it wrote them (the merge)."""
    folder = Path(folder)
    doc = provenance if provenance is not None else read_provenance(folder)
    if doc is None:
        raise InputError(f"{folder}: no {PROVENANCE_PATH} to describe in {BOM_PATH}; the provenance comes first.")
    target = folder / BOM_PATH
    write_atomic(target, (json.dumps(build_bom(folder, doc, name=name, version=version, known=known), indent=2,
                                     sort_keys=True) + "\n").encode("utf-8"))
    return target


def build_bom(folder: Path, provenance: dict, *, name: str | None = None, version: str | None = None,
              known: dict[str, str] | None = None) -> dict:
    """The BOM as a JSON object (CycloneDX 1.6)."""
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6

    facts = explain(provenance)
    build = (provenance.get("predicate") or {}).get("buildDefinition") or {}
    external, internal = build.get("externalParameters") or {}, build.get("internalParameters") or {}
    name = name or facts.get("recipe_name") or folder.name
    files = _folder_files(folder, known or {})
    model = _model(name, version or name, facts, external, files)
    base = _base_model(facts)
    datasets = [_dataset(d) for d in facts["datasets"]]
    libraries = [_library(n, v) for n, v in sorted(facts["versions"].items()) if v and n not in NOT_PACKAGES]
    msov_version = facts["versions"].get("msov") or _own_version()
    finished = facts.get("finished")

    bom = Bom(serial_number=_serial(provenance, name, version),
              metadata=BomMetaData(component=model, timestamp=datetime.fromisoformat(finished) if finished else None,
                                   tools=ToolRepository(components=[_library("msov", msov_version, tool=True)]),
                                   properties=_properties({"msov:python": facts["versions"].get("python"),
                                                           "msov:platform": facts["versions"].get("platform")})),
              components=[c for c in [base, *datasets, *libraries] if c is not None])
    bom.register_dependency(model, [c for c in [base, *libraries] if c is not None])
    doc = json.loads(JsonV1Dot6(bom).output_as_string())
    if not finished:  # the library stamps "now"; a BOM of a bare adapter must still be the same bytes each time
        doc["metadata"].pop("timestamp", None)
    doc["metadata"]["component"]["modelCard"] = _model_card(facts, internal, [d.bom_ref.value for d in datasets])
    data_by_ref = {c.bom_ref.value: _data(d) for c, d in zip(datasets, facts["datasets"])}
    for component in doc.get("components") or []:
        if component.get("bom-ref") in data_by_ref:
            component["data"] = [data_by_ref[component["bom-ref"]]]
    return doc


def _folder_files(folder: Path, known: dict[str, str]) -> dict[str, str]:
    """{name: sha256} of every file the signature will cover, but this BOM (it cannot hash itself)."""
    listed = [f for f in list_files(folder, ignore=(*DEFAULT_IGNORE, BOM_PATH)) if f.name != BOM_PATH]
    todo = [f for f in listed if f.name not in known]
    digests = dict(zip((f.name for f in todo), hash_files([f.path for f in todo])))
    return {f.name: known.get(f.name) or digests[f.name] for f in listed}


def _model(name: str, version: str, facts: dict, external: dict, files: dict[str, str]):
    from cyclonedx.model.component import Component, ComponentType

    export = facts.get("export") or {}
    kind = "merged" if export.get("kind") == "merged" else "adapter"
    lora = dict((external.get("recipe") or {}).get("lora") or {})
    if not lora and export.get("lora"):  # a bare adapter: what the merge read from adapter_config.json
        lora = {"r": export["lora"].get("r"), "alpha": export["lora"].get("lora_alpha"),
                **{k: v for k, v in export["lora"].items() if k not in ("r", "lora_alpha")}}
    params = (facts.get("metrics") or {}).get("parameters") or {}
    weights = {w["name"]: w["sha256"] for w in facts["weights"]}
    properties = {"msov:kind": kind, "msov:base_model": f"{BASE_REF} (fine-tuned from; see dependencies)",
                  "msov:recipe_digest": facts.get("recipe_digest"), "msov:seed": facts.get("seed"),
                  "msov:parameters.trainable": params.get("trainable"), "msov:parameters.total": params.get("total"),
                  **{f"msov:lora.{k}": v for k, v in lora.items()}}
    if kind == "merged":
        properties.update({"msov:merge.dtype": export.get("dtype"), "msov:merge.method": export.get("method"),
                           "msov:merge.adapter_id": export.get("adapter_id"),
                           "msov:merge.base_model_digest": export.get("base_model_digest"),
                           "msov:merge.merged_into": export.get("merged_into")})
    return Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=name, version=version, bom_ref=MODEL_REF,
                     description=f"LoRA {'adapter' if kind == 'adapter' else 'fine-tune merged into its base'}, "
                                 f"made by msov",
                     hashes=_sha256(next(iter(weights.values()))) if len(weights) == 1 else None,
                     properties=_properties(properties),
                     components=[_file(n, d, f"{MODEL_REF}/") for n, d in files.items()])


def _base_model(facts: dict):
    from cyclonedx.model.component import Component, ComponentType

    base = facts.get("base_model") or {}
    files = {f["name"]: f["sha256"] for f in base.get("files") or []}
    if not base.get("path") and not files:
        return None
    digest = subject_digest(files[n] for n in sorted(files, key=sort_key)) if files else None
    # the folder's name, never its local path (the card hides paths too); the files' digests identify it
    return Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=Path(base.get("path") or "base").name,
                     bom_ref=BASE_REF, description="the base model the fine-tune started from",
                     properties=_properties({"msov:architecture": base.get("architecture"),
                                             "msov:oms_subject_digest": digest}),
                     components=[_file(n, d, f"{BASE_REF}/") for n, d in files.items()])


def _dataset(item: dict):
    from cyclonedx.model.component import Component, ComponentType

    name = Path(item["path"]).name
    return Component(type=ComponentType.DATA, name=name, bom_ref=f"dataset/{item.get('split')}/{name}",
                     hashes=_sha256(item["sha256"]),
                     properties=_properties({"msov:split": item.get("split"), "msov:rows": item.get("rows"),
                                             "msov:format": item.get("format")}))


def _data(item: dict) -> dict:
    """The component's `data` (componentData), which the library cannot model yet."""
    return {"type": "dataset", "name": Path(item["path"]).name,
            "description": f"{item.get('split')} split: {item.get('rows')} rows, {item.get('format')} format",
            "contents": {"properties": [{"name": k, "value": str(item[k])}
                                        for k in ("split", "rows", "format") if item.get(k) is not None]}}


def _library(name: str, version: str, *, tool: bool = False):
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    return Component(type=ComponentType.APPLICATION if tool else ComponentType.LIBRARY, name=name, version=version,
                     bom_ref=f"{'tool' if tool else 'library'}/pypi/{name}@{version}",
                     purl=PackageURL(type="pypi", name="mistral-sov" if name == "msov" else name, version=version))


def _file(name: str, digest: str, prefix: str):
    from cyclonedx.model.component import Component, ComponentType

    return Component(type=ComponentType.FILE, name=name, bom_ref=f"{prefix}{name}", hashes=_sha256(digest))


def _model_card(facts: dict, internal: dict, dataset_refs: list[str]) -> dict:
    architecture = (facts.get("base_model") or {}).get("architecture")
    parameters = {"approach": {"type": "supervised"}, "task": "text-generation"}
    if architecture:  # MistralForCausalLM -> mistral
        parameters["modelArchitecture"] = architecture
        parameters["architectureFamily"] = architecture.removesuffix("ForCausalLM").lower() or architecture
    if dataset_refs:
        parameters["datasets"] = [{"ref": ref} for ref in dataset_refs]
    card = {"bom-ref": f"{MODEL_REF}/model-card", "modelParameters": parameters}
    metrics = _performance((facts.get("metrics") or {}).get("eval") or {})
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    considerations = _considerations(facts, internal.get("data_scan"))
    if considerations:
        card["considerations"] = considerations
    return card


def _performance(evals: dict) -> list[dict]:
    """Held-out loss and perplexity before and after training (the same eval split both times)."""
    out = []
    for when in ("before", "after"):
        result = evals.get(when) or {}
        for metric in ("loss", "perplexity"):
            if result.get(metric) is not None:
                out.append({"type": f"eval_{metric}", "value": repr(float(result[metric])),
                            "slice": f"held-out eval split, {when} fine-tuning ({result.get('tokens')} tokens)"})
    return out


def _considerations(facts: dict, scan: dict | None) -> dict:
    """The personal-data scan's summary (counts only, as the provenance keeps it) and what a merge changes."""
    out = {}
    if (facts.get("export") or {}).get("trained_with_quantization"):
        out["technicalLimitations"] = [("the adapter was trained against a quantized base and merged into its "
                                        "full-precision weights: outputs can differ slightly from the training setup")]
    if scan:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted((scan.get("counts") or {}).items())) or "nothing found"
        out["ethicalConsiderations"] = [{
            "name": "personal data and secrets in the training data",
            "mitigationStrategy": f"msov scanned {scan.get('files')} files ({scan.get('rows')} rows) before training; "
                                  f"findings by kind: {counts}"}]
    return out


def _properties(values: dict):
    from cyclonedx.model import Property

    return [Property(name=k, value=v if isinstance(v, str) else json.dumps(v, sort_keys=True))
            for k, v in values.items() if v is not None]


def _sha256(digest: str):
    from cyclonedx.model import HashAlgorithm, HashType

    return [HashType(alg=HashAlgorithm.SHA_256, content=digest)]


def _serial(provenance: dict, name: str, version: str | None) -> uuid.UUID:
    """One serial number per described output: from the weights' digests (the provenance subject) and the name."""
    weights = subject_digest(s["digest"]["sha256"] for s in provenance.get("subject") or [])
    kind = ((explain(provenance).get("export") or {}).get("kind")) or "adapter"
    return uuid.uuid5(_SERIAL_NAMESPACE, hashlib.sha256(f"{weights}\n{kind}\n{name}\n{version}".encode()).hexdigest())


def _own_version() -> str:
    from .. import __version__

    return __version__
