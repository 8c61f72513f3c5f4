"""The adapter registry: versioned adapters in a folder (`DIR/<name>/<version>/`), what an entry is, and the listing.

An entry carries its signature inside (`model.sig`, which the signature leaves out of what it covers), so one rename
publishes folder and signature together, and the name and version it was published as (`msov/registry.json`,
signed with the rest: a copied or renamed version folder no longer verifies). A version is published once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InputError, MsovError, UsageError
from ..trust.hashing import DEFAULT_IGNORE, folder_digest
from ..trust.oms import bundle_claims
from .source import base_digest

REGISTRY_SIG = "model.sig"
ENTRY_PATH = "msov/registry.json"  # the name and version an entry was published (and signed) as
ENTRY_IGNORE = (*DEFAULT_IGNORE, REGISTRY_SIG)  # what an entry's digest and signature leave out
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Semantic Versioning 2.0.0: MAJOR.MINOR.PATCH, optional -prerelease and +build.
_VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def entry_folder(registry: Path, name: str, version: str | None) -> Path:
    """REGISTRY/<name>/<version>/, after checking that both are what a registry accepts."""
    if not version or not _VERSION.match(version):
        raise UsageError(f"--version {version!r}: expected a semantic version such as 1.4.0 (MAJOR.MINOR.PATCH).")
    if not _NAME.match(name):
        raise UsageError(f"--name {name!r}: letters, digits, '.', '_' and '-' only, starting with a letter or digit.")
    return Path(registry) / name / version


def write_entry_name(folder: Path, name: str, version: str) -> None:
    (folder / ENTRY_PATH).parent.mkdir(parents=True, exist_ok=True)
    (folder / ENTRY_PATH).write_text(json.dumps({"name": name, "version": version}) + "\n")


def existing_entry(target: Path, name: str, version: str | None, digest: str, base_id: str | None) -> dict:
    """A version is published once: the same bytes again is a no-op ("unchanged"), anything else is refused."""
    existing = folder_digest(target, ignore=ENTRY_IGNORE)
    if existing != digest:
        raise InputError(f"{target}: version {version} of {name} already exists with other content "
                         f"(sha256:{existing[:16]}… there, sha256:{digest[:16]}… now); a published version is "
                         f"never overwritten.", hint="Publish under a new --version.")
    sig = target / REGISTRY_SIG
    return {"status": "unchanged", "name": name, "version": version, "path": str(target), "adapter_id": digest,
            "sig": str(sig) if sig.is_file() else None, "key_hint": bundle_claims(sig).get("key_hint"),
            "base_model_digest": base_id, "tokenizer_files": []}


def list_registry(registry: Path, *, pub: Path | None = None) -> list[dict]:
    """Every DIR/<name>/<version>/: digest (recomputed), base model digest, date, signer, approvers (as their
    approvals beside the entry claim, for these very files: `msov verify --require` checks them); with `pub`,
    each entry verified on its own, against the name and version it was signed as."""
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
                            "base_model_digest": None, "date": None, "signed_by": None, "approved_by": [],
                            "status": f"FAILED: {exc.message}", "path": str(folder)})
    return sorted(entries, key=lambda e: (e["name"], _version_key(e["version"])))


def _entry(folder: Path, pub: Path | None) -> dict:
    from ..trust.approvals import approvers_of
    from ..trust.oms import verify_folder
    from ..trust.provenance import explain, read_provenance

    digest = folder_digest(folder, ignore=ENTRY_IGNORE)
    facts = explain(read_provenance(folder) or {})
    files = {f["name"]: f["sha256"] for f in facts["base_model"]["files"]}
    sig = folder / REGISTRY_SIG
    bundle = bundle_claims(sig)
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
            "signed_by": bundle.get("signer"), "approved_by": approvers_of(folder, digest), "status": status,
            "path": str(folder)}


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
