"""What a report says, gathered without trusting anything first: the folder is verified, and a failure is recorded as
the verdict rather than raised, so that the auditor still gets a dossier (a red one, naming what failed).

Every fact carries where it comes from: the signed provenance (covered by the signature), or a file beside the
folder (loss.png, FOLDER.reproduced.json) that no signature covers. Nothing is fetched: only local files are read.
"""

from __future__ import annotations

import base64
import datetime
import json
import platform
from pathlib import Path

from .. import __version__
from ..errors import VerificationError
from ..trust.approvals import approvals_of, approvers_of, verify_parties
from ..trust.hashing import printable
from ..trust.oms import default_sig_path, verify_folder
from ..trust.provenance import PROVENANCE_PATH, explain, parse_provenance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PLOT_BYTES = 8 * 1024 * 1024  # a loss plot is tens of KiB; anything far larger is not one and bloats the page
BOM_NAMES = ("bom.cdx.json", "msov/bom.cdx.json")


def gather(folder: Path, *, key: Path | None = None, ca: tuple[Path, ...] = (), require: tuple[Path, ...] = (),
           sig: Path | None = None, tsa_ca: tuple[Path, ...] = (), now: datetime.datetime | None = None) -> dict:
    """Everything the report shows, as plain data (strings, numbers, lists, dicts: the page escapes each one)."""
    folder = Path(folder)
    verdict = _verify(folder, key=key, ca=ca, require=require, sig=sig, tsa_ca=tsa_ca)
    doc, provenance_note = verdict.pop("provenance_doc", None), None
    if doc is None and not verdict["ok"]:
        doc, provenance_note = _unverified_provenance(folder)
    explained = explain(doc) if doc else None
    build = ((doc or {}).get("predicate") or {}).get("buildDefinition") or {}
    return {
        "folder": str(folder),
        "generated_at": (now or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="seconds"),
        "generator": {"msov": __version__, "python": platform.python_version()},
        "verdict": verdict,
        "provenance": explained,
        "provenance_verified": bool(verdict["ok"] and doc),
        "provenance_note": provenance_note,
        "recipe": (build.get("externalParameters") or {}).get("recipe"),
        "data_scan": (build.get("internalParameters") or {}).get("data_scan"),
        "bom": _bom(folder, verdict),
        "reproduced": _reproduced(folder, verdict.get("subject_digest")),
        "loss_plot": _loss_plot(folder),
    }


def _verify(folder: Path, *, key, ca, require, sig, tsa_ca) -> dict:
    options = dict(sig_path=sig, ca=tuple(ca), tsa_ca=tuple(tsa_ca))
    sig_path = Path(sig) if sig else default_sig_path(folder)
    try:
        report = verify_parties(folder, list(require), **options) if require else \
            verify_folder(folder, key, **options)
    except VerificationError as exc:
        return {"ok": False, "error": printable(exc.message or str(exc)), "hint": exc.hint, "sig": str(sig_path),
                "claimed_approvals": [str(p) for p in approvals_of(folder)]}
    signer = report["key"]
    parties = report.get("parties") or []
    return {
        "ok": True, "error": None, "sig": report["sig"], "subject_digest": report["subject_digest"],
        "files": report["files"], "unsigned": report.get("unsigned") or [], "signer": signer,
        # --require: each party verified like the signer; otherwise approvals beside the folder are claims only
        "approvals": [p for p in parties if p.get("role") == "approver"],
        "claimed_approvals": [] if require else approvers_of(folder, report["subject_digest"]),
        "required": [str(p) for p in require],
        "timestamp": ({"status": "verified", "time": signer["signed_at"]} if signer.get("signed_at") else
                      {"status": "present, not checked (pass --tsa-ca)"} if signer.get("timestamp") else
                      {"status": "none"}),
        "provenance_doc": report.get("provenance"),
    }


def _unverified_provenance(folder: Path) -> tuple[dict | None, str]:
    """A folder that failed verification still says what it claims to be; shown, marked as unverified."""
    path = folder / PROVENANCE_PATH
    try:
        return parse_provenance(path.read_bytes(), path, error=VerificationError), \
            "UNVERIFIED: the folder does not match its signature; these are its claims, not established facts."
    except (OSError, VerificationError) as exc:
        return None, f"no readable provenance ({printable(str(getattr(exc, 'message', exc)))})"


def _bom(folder: Path, verdict: dict) -> dict | None:
    """The CycloneDX ML-BOM, when the folder carries one: signed when the verified file list holds it."""
    signed = {f["name"] for f in verdict.get("files") or []}
    for name in BOM_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            return {"name": name, "signed": name in signed, "error": f"not readable as JSON ({exc})"}
        components = doc.get("components") if isinstance(doc, dict) else None
        return {"name": name, "signed": name in signed, "spec_version": (doc or {}).get("specVersion"),
                "components": [{"type": c.get("type"), "name": c.get("name"), "version": c.get("version")}
                               for c in components or [] if isinstance(c, dict)]}
    return None


def _reproduced(folder: Path, subject_digest: str | None) -> dict | None:
    """FOLDER.reproduced.json beside the folder (written by `msov reproduce`): not signed, so reported as a claim,
    and checked against the digest that was just verified."""
    resolved = folder.resolve()
    path = resolved.parent / f"{resolved.name}.reproduced.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        return {"path": str(path), "error": f"not readable ({exc})"}
    expected = doc.get("expected_digest")
    return {"path": str(path), "status": doc.get("status"), "checked_at": doc.get("checked_at"),
            "expected_digest": expected, "got_digest": doc.get("got_digest"),
            "matches_verified": None if subject_digest is None or expected is None else expected == subject_digest}


def _loss_plot(folder: Path) -> dict | None:
    """The run's loss.png lives beside run.json, in the run folder that holds `adapter/`; read, never fetched."""
    run_dir = folder.resolve().parent
    path = run_dir / "loss.png"
    if not (path.is_file() and (run_dir / "run.json").is_file()):
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror or str(exc)}
    if not data.startswith(PNG_MAGIC) or len(data) > MAX_PLOT_BYTES:
        return {"path": str(path), "error": "not a PNG image of a sensible size"}
    return {"path": str(path), "data_uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii")}
