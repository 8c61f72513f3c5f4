"""Separation of duties: whoever trains signs, someone else approves the release, and a verifier can require both.

An approval is a second, ordinary OMS bundle over the very same files, made by another party, beside the folder:
FOLDER.approval-<the approver's key fingerprint, 12 hex>.sig. A second bundle rather than a second signature in
the first envelope, because a Sigstore bundle v0.3 carries exactly one DSSE signature (model_signing refuses more,
as msov does): each approval stays verifiable on its own by the reference tool, the trainer's signature file is
never rewritten (approving cannot damage it), and approvers are added one by one, later, each in their own file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, VerificationError
from .hashing import DEFAULT_IGNORE
from .keys import key_hint, load_public_key
from .oms import bundle_claims, default_sig_path, sign_folder, verify_folder
from .signer import Signer


def approval_path(folder: Path, hint: str) -> Path:
    primary = default_sig_path(folder)
    return primary.with_name(f"{Path(folder).resolve().name}.approval-{hint[:12]}.sig")


def approvals_of(folder: Path) -> list[Path]:
    resolved = Path(folder).resolve()
    return sorted(resolved.parent.glob(f"{_glob_safe(resolved.name)}.approval-*.sig"))


def approve(folder: Path, signer: Signer, *, signed_by: Path | None = None, ca: tuple[Path, ...] = (),
            sig_path: Path | None = None) -> dict:
    """Countersign `folder` after checking it against its signature: an approver vouches only for what they
    verified, so the trainer's public key (`signed_by`) or the CA roots (`ca`) are required. The approval lists
    exactly the files the signature lists (the same ignore paths), or it is not written."""
    if signed_by is None and not ca:
        raise InputError("approve: pass --signed-by TRAINER.pub or --ca ROOT.crt: an approval is given only for a "
                         "folder whose signature was checked first.")
    checked = verify_folder(folder, signed_by, sig_path=sig_path, ca=ca)
    if checked["key"]["hint"] == key_hint(signer.public_key):
        raise InputError(f"{folder}: the approver's key is the key that signed it; an approval must come from "
                         f"another party.", hint="Approve with your own key.")
    ignore = tuple(p for p in checked["ignore_paths"] if p not in DEFAULT_IGNORE and not _is_approval(p))
    target = approval_path(folder, key_hint(signer.public_key))
    signed = sign_folder(folder, signer, sig_path=target, ignore=ignore)
    if signed["subject_digest"] != checked["subject_digest"]:  # the folder changed between the check and now
        target.unlink(missing_ok=True)
        raise VerificationError(f"{folder}: changed while it was being approved; nothing was approved.")
    return {"status": "approved", "folder": str(folder), "approval": str(target), "approver": signed["signer"],
            "signer": checked["key"], "subject_digest": signed["subject_digest"]}


def verify_parties(folder: Path, parties: list[Path], *, sig_path: Path | None = None, ca: tuple[Path, ...] = (),
                   ignore: tuple[str, ...] = (), ignore_unsigned: bool = False, tsa_ca: tuple[Path, ...] = ()) -> dict:
    """`msov verify --require A --require B`: passes only when every required party (a public key, or a
    certificate checked up to a `ca` root) signed or approved the folder, and every one of them the same files."""
    bundles = [Path(sig_path) if sig_path else default_sig_path(folder), *approvals_of(folder)]
    root = Path(folder).resolve()
    if bundles[0].resolve().is_relative_to(root):  # a registry entry's model.sig: left out by every approval too
        ignore = (*ignore, bundles[0].resolve().relative_to(root).as_posix())
    claims = {bundle: bundle_claims(bundle) for bundle in bundles}
    reports, seen, first = [], set(), None
    for party in parties:
        wanted, certificate = _party_key(party, ca)
        found = [b for b in bundles if claims[b].get("key_hint") == wanted and b not in seen]
        if not found:
            present = ", ".join(b.name for b in bundles if b.exists()) or "none"
            raise VerificationError(f"{folder}: no signature or approval by {party} (key fingerprint "
                                    f"SHA256:{wanted[:16]}…) among: {present}.",
                                    hint="Each --require party must have signed (`msov sign`) or approved "
                                         "(`msov approve`) this folder.")
        bundle = found[0]
        seen.add(bundle)
        report = verify_folder(folder, None if certificate else party, sig_path=bundle, ca=ca, ignore=ignore,
                               ignore_unsigned=ignore_unsigned, tsa_ca=tsa_ca)
        if certificate is not None and report["key"].get("certificate_fingerprint") != certificate:
            raise VerificationError(f"{bundle}: made with the key of {party} but under another certificate.")
        reports.append({"party": str(party), "sig": str(bundle), "role": "signer" if bundle == bundles[0]
                        else "approver", **report["key"]})
        if first is not None and _files(report) != _files(first):
            raise VerificationError(f"{bundle}: {party} signed other files than {reports[0]['party']}; the parties "
                                    f"did not approve the same content.")
        first = first or report
    return {**first, "key": reports[0], "parties": reports}


def approvers_of(folder: Path, subject_digest: str | None) -> list[str]:
    """Who approved these very files, as their approvals claim (nothing verified: for listings)."""
    found = []
    for bundle in approvals_of(folder):
        claim = bundle_claims(bundle)
        if claim.get("subject_digest") == subject_digest:
            found.append(claim.get("signer") or f"SHA256:{claim.get('key_hint', '?')}")
    return found


def _party_key(party: Path, ca: tuple[Path, ...]) -> tuple[str, str | None]:
    """(key hint, certificate fingerprint or None) of a --require file: a PEM public key or a certificate."""
    try:
        data = Path(party).read_bytes()
    except OSError as exc:
        raise InputError(f"--require {party}: cannot be read ({exc.strerror or exc}).") from None
    if b"CERTIFICATE-----" not in data:
        return key_hint(load_public_key(Path(party))), None
    if not ca:
        raise InputError(f"--require {party}: a certificate party is checked up to its root CA.",
                         hint="Pass --ca ROOT.crt as well.")
    from .certs import certificate_fingerprint, load_certificates

    cert = load_certificates(Path(party), "--require")[0]
    return key_hint(cert.public_key()), certificate_fingerprint(cert)


def _files(report: dict) -> list[tuple[str, str]]:
    return [(f["name"], f["digest"]) for f in report["files"]]


def _is_approval(path: str) -> bool:
    return ".approval-" in path and path.endswith(".sig")


def _glob_safe(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
