"""`msov reproduce`: re-run a signed training from its provenance and check the adapter comes out the same.

1. the folder's signature and provenance must verify with the given key;
2. the base model, start adapter (model.adapter) and data files on disk must have the digests the provenance
   recorded;
3. training runs again with the recorded recipe and seed, into a scratch folder;
4. the new weight files are compared with the recorded ones. Where identity cannot be expected (other library
   versions, another device), the report says why and compares held-out loss instead.

The outcome is written beside the folder, never inside it (the signed folder must not change):
FOLDER.reproduced.json, whether the weights were reproduced or differ, for whoever reports on the folder later.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import VerificationError
from .events import EventSink, no_events

EVAL_LOSS_TOLERANCE = 0.02  # relative; for runs that cannot be bit-identical
COMPARED_VERSIONS = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "msov")


def reproduce(folder: Path, public_key: Path, *, sig_path: Path | None = None, out: Path | None = None,
              on_event: EventSink = no_events) -> dict:
    from .recipe import validate_recipe
    from .train.pipeline import environment_versions, finetune
    from .trust.hashing import sha256_file
    from .trust.oms import verify_folder
    from .trust.provenance import explain, read_provenance

    # 1. trust nothing that is not signed
    on_event("stage", {"text": "verifying signature and provenance"})
    verify_folder(folder, public_key, sig_path=sig_path)
    doc = read_provenance(folder)
    if doc is None:
        raise VerificationError(f"{folder}: no msov/provenance.json; there is nothing to reproduce from.")
    info = explain(doc)
    external = doc["predicate"]["buildDefinition"]["externalParameters"]
    if not external.get("recipe"):
        raise VerificationError(f"{folder}: the provenance records no recipe.")

    # 2. the inputs on disk must be the recorded ones
    on_event("stage", {"text": "checking base model and data digests"})
    base_dir = Path(info["base_model"]["path"] or "")
    expected = [(base_dir / f["name"], f["sha256"]) for f in info["base_model"]["files"]]
    expected += [(Path(d["path"]), d["sha256"]) for d in info["start_adapter"] + info["datasets"]]
    problems = []
    for path, digest in expected:
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from the recorded {digest[:12]}…")
    if problems:
        raise VerificationError("the inputs on disk are not the ones this adapter was trained on:\n  "
                                + "\n  ".join(problems))

    # 3. train again, same recipe and seed, somewhere that cannot clash with the original
    scratch = Path(tempfile.mkdtemp(prefix="msov-reproduce-")) if out is None else None
    target = Path(out) if out is not None else scratch / "run"
    raw = dict(external["recipe"])
    raw["output"] = {**raw["output"], "dir": str(target), "sign_key": None}
    try:
        record = finetune(validate_recipe(raw, source="provenance recipe"), on_event=on_event)

        # 4. compare what came out
        recorded = {w["name"]: w["sha256"] for w in info["weights"]}
        fresh = {name: sha256_file(target / "adapter" / name) for name in recorded
                 if (target / "adapter" / name).is_file()}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    identical = fresh == recorded
    now = environment_versions()
    then = info["versions"]
    version_changes = {k: [then.get(k), now.get(k)] for k in COMPARED_VERSIONS if then.get(k) != now.get(k)}
    device_then = (info.get("hardware") or {}).get("accelerators")
    recorded_loss = ((info["metrics"].get("eval") or {}).get("after") or {}).get("loss")
    new_loss = record.eval.after.loss if record.eval.after else None
    report = {"folder": str(folder), "identical": identical, "recorded": recorded, "reproduced": fresh,
              "version_changes": version_changes, "eval_loss": {"recorded": recorded_loss, "reproduced": new_loss},
              "kept_at": str(target) if out is not None else None, "result_file": str(result_path(folder))}
    if identical:
        report["status"] = "identical"
        write_result(folder, report)
        return report
    reasons = [f"{k} {a} -> {b}" for k, (a, b) in version_changes.items()]
    if device_then:
        reasons.append("the original ran on a GPU, whose kernels are not bit-deterministic")
    close = (recorded_loss is not None and new_loss is not None
             and abs(new_loss - recorded_loss) <= EVAL_LOSS_TOLERANCE * abs(recorded_loss))
    report["reasons"] = reasons
    if reasons and close:
        report["status"] = "equivalent"
        write_result(folder, report)
        return report
    why = "; ".join(reasons) if reasons else "same library versions and device, so it should have been identical"
    report["status"] = "differs"
    write_result(folder, report)
    raise VerificationError(
        f"the reproduced adapter differs from the signed one ({why}); eval loss recorded {recorded_loss}, "
        f"reproduced {new_loss}.",
        hint="Check the library versions (msov version) and that the run used deterministic CPU settings.")


def result_path(folder: Path) -> Path:
    """FOLDER.reproduced.json: beside the folder, as FOLDER.sig is, so that the signed files stay as signed."""
    folder = Path(folder)
    folder = folder if folder.name else folder.resolve()  # `adapter/.` has no name of its own
    return folder.with_name(folder.name + ".reproduced.json")


def write_result(folder: Path, report: dict) -> Path:
    """Record the outcome (atomically): reproduced (byte-identical or equivalent) or differs, with the digests over
    the signed weights and the re-run's (each the OMS subject digest of the weight files, in name order)."""
    from . import __version__
    from .trust.hashing import sort_key, subject_digest, write_atomic

    def weights_digest(digests: dict[str, str]) -> str | None:
        return subject_digest(digests[n] for n in sorted(digests, key=sort_key)) if digests else None

    status = report["status"]
    result = {
        "status": "differs" if status == "differs" else "reproduced",
        "match": status,  # identical | equivalent (within the eval-loss tolerance) | differs
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "folder": str(Path(folder).resolve()),
        "expected_digest": weights_digest(report["recorded"]), "got_digest": weights_digest(report["reproduced"]),
        "weights": {"recorded": report["recorded"], "reproduced": report["reproduced"]},
        "eval_loss": report["eval_loss"], "eval_loss_tolerance": EVAL_LOSS_TOLERANCE,
        "version_changes": report["version_changes"], "reasons": report.get("reasons", []),
        "msov_version": __version__,
    }
    path = result_path(folder)
    write_atomic(path, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path
