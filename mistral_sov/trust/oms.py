"""Signing and verification in the OpenSSF Model Signing (OMS) v1.0 format.

What is written is exactly what the reference implementation (`model_signing`) writes for `sign key`: a Sigstore
bundle (v0.3, JSON) holding a DSSE envelope around an in-toto Statement v1 whose predicate lists every file of
the folder with its sha256. It is produced here with `cryptography` alone, so msov carries no Sigstore stack,
and an auditor can check it with either tool, offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path

from ..errors import InputError, VerificationError
from .hashing import (DEFAULT_IGNORE, compare_manifests, hash_files, list_files, manifest_of, printable, subject_digest,
                      write_atomic)
from .keys import is_within, key_hint, load_public_key, refuse_secrets
from .provenance import PROVENANCE_PATH, STATEMENT_TYPE, check_provenance, parse_provenance
from .signer import KeyFileSigner, Signer, ecdsa_for

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_HEX64 = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: no trailing newline slips through


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed (lengths in bytes)."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_folder(folder: Path, key: "Path | Signer", *, sig_path: Path | None = None,
                passphrase: bytes | None = None, known: dict[str, str] | None = None) -> dict:
    """Sign every file of `folder`; write the OMS bundle to `sig_path` (default: FOLDER.sig beside it).

    `key`: a private key file, or any Signer (signer.py: an HSM key, a key with its certificate). The passphrase
    of an encrypted key file, when not given, comes from $MSOV_KEY_PASSPHRASE (never from argv).
    `known` ({relative name: sha256}) is for a caller that hashed the very bytes it just wrote (the merge): those
    files are signed without being read again. Verification never trusts it: verify_folder re-hashes every file.
    Returns {"sig", "subject_digest", "files", "key_hint"}.
    """
    folder = Path(folder)
    root = folder.resolve()
    key_path = Path(key) if isinstance(key, (str, Path)) else getattr(key, "path", None)
    if key_path is not None and is_within(key_path.resolve(), root):
        raise InputError(f"{key_path}: the private key lies inside the folder to sign; it would be signed into "
                         f"the output and shipped with it.", hint="Keep keys outside every output folder.")
    signer = KeyFileSigner(key_path, passphrase) if isinstance(key, (str, Path)) else key
    sig_path = Path(sig_path) if sig_path else default_sig_path(folder)
    refuse_secrets(folder, key=key_path)

    # 1. the manifest: every file, streamed and hashed in parallel (the signature itself when it lies inside)
    ignore, known = _ignore_paths(root, sig_path), known or {}
    if not all(_HEX64.fullmatch(str(d)) for d in known.values()):
        raise InputError(f"{folder}: a known digest is not a lowercase hex sha256.")
    listed = list_files(folder, ignore=ignore)
    unsafe = [f.name for f in listed if not _safe_name(f.name)]
    if unsafe:  # verify refuses such a name, so a signature over it could never pass
        raise InputError(f"{folder}: '{printable(unsafe[0])}' cannot be signed: a signed name holds no backslash "
                         f"(a path separator on Windows) and no control character.", hint="Rename the file.")
    files = manifest_of(listed, known=known)
    if not files:
        raise InputError(f"{folder}: the folder holds no files to sign.")
    statement = make_statement(root.name, files, ignore)

    # 2. the DSSE envelope over the statement, in a Sigstore bundle
    payload = json.dumps(statement, indent=2).encode("utf-8")
    signature = signer.sign(pae(PAYLOAD_TYPE, payload))
    hint = key_hint(signer.public_key)
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {**signer.material(), "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii"), "keyid": ""}],
        },
    }
    sig_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(sig_path, (json.dumps(bundle, indent=2) + "\n").encode("utf-8"), mode=0o644)
    return {"sig": str(sig_path), "subject_digest": statement["subject"][0]["digest"]["sha256"],
            "files": len(files), "key_hint": hint, "signer": signer.describe()}


def check_signature_target(sig_path: Path, folder: Path, key_path: Path) -> None:
    """`msov sign --out`: never over the key, never inside what is signed (it would overwrite a signed file and
    leave it out of the list), never over a file that is not an earlier signature."""
    sig, root = Path(sig_path), Path(folder).resolve()
    if sig.is_symlink():
        raise InputError(f"--out {sig}: is a symbolic link; give the signature's real path.")
    if sig.exists() and Path(key_path).exists() and sig.samefile(key_path):
        raise InputError(f"--out {sig}: is the private key itself; signing would destroy it.")
    if is_within(sig.resolve(), root):
        raise InputError(f"--out {sig}: lies inside the folder being signed ({folder}).",
                         hint="Write the signature beside the folder (the default: FOLDER.sig).")
    if sig.exists():
        try:
            _read_bundle(sig)
        except VerificationError:
            raise InputError(f"--out {sig}: exists and is not a signature bundle; msov replaces only an earlier "
                             f"signature.", hint="Choose another --out, or move that file away.") from None


def make_statement(name: str, files: list[dict], ignore_paths: list[str]) -> dict:
    """The in-toto Statement of an OMS v1.0 signature: no predicate fields beyond what the schema allows."""
    resources = [{"name": f["name"], "algorithm": "sha256", "digest": f["digest"]} for f in files]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": subject_digest(r["digest"] for r in resources)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": list(ignore_paths)},
            "resources": resources,
        },
    }


def verify_folder(folder: Path, pub_path: "Path | None" = None, *, sig_path: Path | None = None,
                  ca: tuple[Path, ...] = (), ignore: tuple[str, ...] = (), ignore_unsigned: bool = False) -> dict:
    """Check `folder` against its signature: key method with the public key at `pub_path`, certificate method
    with the CA roots `ca` (certs.py). `ignore`: paths the verifier itself chooses to skip (OMS §6.2.1; a bundle
    alone never widens what is skipped); `ignore_unsigned`: files on disk the signature does not list are not an
    error (OMS §8.5).

    Raises VerificationError naming the first thing wrong (bundle, key, signature, statement) or every file that
    differs (changed, added, removed, renamed). Returns a report: files, subject digest, signer, provenance.
    """
    folder = Path(folder)
    root = folder.resolve()
    if not folder.is_dir():
        raise VerificationError(f"{folder}: no such folder to verify.")
    sig_path = Path(sig_path) if sig_path else default_sig_path(folder)

    # 1. the bundle, who signed it and the signature: nothing in the payload is trusted before this passes
    bundle = _read_bundle(sig_path)
    payload, signer = _check_envelope(bundle, sig_path, pub_path, ca)

    # 2. the signed statement: types, ignore paths, resources, subject digest
    statement = _check_statement(payload, sig_path, allowed_ignore=_ignore_paths(root, sig_path))
    expected = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    ignore = statement["predicate"]["serialization"].get("ignore_paths", [])

    # 3. the folder as it is on disk, against the signed list
    on_disk = list_files(folder, ignore=ignore, error=VerificationError)
    actual = dict(zip((f.name for f in on_disk), hash_files([f.path for f in on_disk])))
    problems = compare_manifests(expected, actual)
    if problems:
        raise VerificationError(f"{folder}: does not match its signature {sig_path}: " + "; ".join(problems) + ".",
                                hint="Any change after signing fails verification; re-sign only what you trust.")

    # 4. the provenance inside the folder must describe these very files; it is read once and its bytes checked
    #    against the signed digest, so a change between hashing and reading cannot slip through
    provenance = None
    if PROVENANCE_PATH in expected:
        data = (folder / PROVENANCE_PATH).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected[PROVENANCE_PATH]:
            raise VerificationError(f"{folder / PROVENANCE_PATH}: changed while it was being verified.")
        provenance = parse_provenance(data, folder / PROVENANCE_PATH, error=VerificationError)
        mismatch = check_provenance(provenance, expected)
        if mismatch:
            raise VerificationError(f"{folder}/msov/provenance.json: " + "; ".join(mismatch) + ".")
    sizes = {f.name: f.size for f in on_disk}
    return {
        "status": "verified",
        "folder": str(folder),
        "sig": str(sig_path),
        "subject": statement["subject"][0]["name"],
        "subject_digest": statement["subject"][0]["digest"]["sha256"],
        "files": [{"name": n, "digest": d, "size": sizes[n]} for n, d in expected.items()],
        "ignore_paths": ignore,
        "key": signer,
        "provenance": provenance,
    }


def _check_envelope(bundle: dict, sig_path: Path, pub_path, ca: tuple[Path, ...]) -> tuple[bytes, dict]:
    """The DSSE signature checked with the signer's key; returns the payload and who signed
    ({"method", "path", "hint", "fingerprint", "curve"} for the key method)."""
    envelope = bundle["dsseEnvelope"]
    # a public key object is for the caller that derived it from the private key it holds (export)
    public_key = load_public_key(Path(pub_path)) if isinstance(pub_path, (str, Path)) else pub_path
    hint = key_hint(public_key)
    claimed = _get(bundle, "verificationMaterial", "publicKey", "hint")
    if claimed and claimed != hint:
        raise VerificationError(f"{sig_path}: signed by another key (key hint {str(claimed)[:16]}…), not by "
                                f"{pub_path} (key hint {hint[:16]}…).", hint="Verify with the signer's public key.")
    payload = _b64(envelope.get("payload"), sig_path, "dsseEnvelope.payload")
    signature = _b64(envelope["signatures"][0].get("sig"), sig_path, "dsseEnvelope.signatures[0].sig")
    if not _signature_ok(public_key, signature, pae(envelope["payloadType"], payload)):
        raise VerificationError(f"{sig_path}: the signature does not verify with {pub_path}: the signature or the "
                                f"signed payload was changed, or another key made it.")
    return payload, {"method": "key", "path": str(pub_path), "hint": hint, "fingerprint": f"SHA256:{hint}",
                     "curve": public_key.curve.name}


def _check_statement(payload: bytes, sig_path: Path, *, allowed_ignore: list[str]) -> dict:
    def bad(what: str) -> VerificationError:
        return VerificationError(f"{sig_path}: the signed statement {what}.")

    try:
        statement = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("is not JSON") from None
    except RecursionError:
        raise bad("is nested too deeply to be a statement") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise bad(f"is not an in-toto Statement v1 (_type must be {STATEMENT_TYPE})")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise bad(f"has predicateType {statement.get('predicateType')!r}, expected {PREDICATE_TYPE}")
    subjects, predicate = statement.get("subject"), statement.get("predicate")
    if not isinstance(subjects, list) or len(subjects) != 1 or not _HEX64.fullmatch(str(_get(subjects[0], "digest",
                                                                                          "sha256"))):
        raise bad("must have exactly one subject with a sha256 digest")
    if not isinstance(predicate, dict) or set(predicate) != {"serialization", "resources"}:
        raise bad("predicate must hold exactly 'serialization' and 'resources'")
    serialization = predicate["serialization"]
    wanted = {"method": "files", "hash_type": "sha256", "allow_symlinks": False}
    if (not isinstance(serialization, dict) or any(serialization.get(k) != v for k, v in wanted.items())
            or set(serialization) - {*wanted, "ignore_paths"}):
        raise bad(f"serialization must be {wanted} (plus ignore_paths), got {serialization}")
    ignore = serialization.get("ignore_paths", [])
    extra = [p for p in ignore if not isinstance(p, str) or p.rstrip("/") not in allowed_ignore] \
        if isinstance(ignore, list) else [ignore]
    if extra:
        raise bad(f"ignores paths beyond the defaults ({', '.join(map(str, extra))}): files there would go "
                  f"unchecked")
    resources, seen = predicate["resources"], set()
    if not isinstance(resources, list):
        raise bad("resources must be a list")
    for item in resources:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not _safe_name(name):
            raise bad(f"lists a path that is not a plain relative path inside the folder: {name!r}")
        if item.get("algorithm") != "sha256" or not _HEX64.fullmatch(str(item.get("digest", ""))):
            raise bad(f"lists {name} without a sha256 digest")
        if name in seen:
            raise bad(f"lists {name} twice")
        seen.add(name)
    recomputed = subject_digest(r["digest"] for r in resources)
    if recomputed != subjects[0]["digest"]["sha256"]:
        raise bad(f"is inconsistent: the subject digest is {subjects[0]['digest']['sha256'][:16]}… but the "
                  f"listed files hash to {recomputed[:16]}…")
    return statement


def bundle_claims(sig_path: Path) -> dict:
    """{"key_hint", "subject_digest"} a signature bundle claims, nothing verified ({} when unreadable): enough to
    list a registry entry's signer, or to see that its folder changed since signing."""
    try:
        bundle = json.loads(Path(sig_path).read_bytes())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        return {"key_hint": bundle["verificationMaterial"]["publicKey"]["hint"],
                "subject_digest": statement["subject"][0]["digest"]["sha256"]}
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError):
        return {}


def _read_bundle(sig_path: Path) -> dict:
    if not sig_path.is_file():
        raise VerificationError(f"{sig_path}: no signature there.",
                                hint="Pass --sig PATH when the signature is not FOLDER.sig beside the folder.")
    try:
        bundle = json.loads(sig_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"{sig_path}: not a valid signature bundle (not JSON: {exc.msg} at byte {exc.pos}; "
                                f"truncated?).") from None
    except RecursionError:  # a hostile bundle of nested brackets, not a signature
        raise VerificationError(f"{sig_path}: not a valid signature bundle (JSON nested too deeply).") from None
    if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        got = bundle.get("mediaType") if isinstance(bundle, dict) else type(bundle).__name__
        raise VerificationError(f"{sig_path}: not a Sigstore bundle v0.3 (mediaType {got!r}, expected "
                                f"{BUNDLE_MEDIA_TYPE}).")
    envelope = bundle.get("dsseEnvelope")
    if not isinstance(envelope, dict):
        raise VerificationError(f"{sig_path}: the bundle holds no DSSE envelope.")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise VerificationError(f"{sig_path}: envelope payloadType {envelope.get('payloadType')!r}, expected "
                                f"{PAYLOAD_TYPE}.")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1 or not isinstance(signatures[0], dict):
        raise VerificationError(f"{sig_path}: the envelope must carry exactly one signature.")
    return bundle


def _b64(value, sig_path: Path, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise VerificationError(f"{sig_path}: {field} is not valid base64.") from None


def _get(value, *keys):
    """value[k1][k2]... or None when any level is missing or not an object (the bundle is untrusted input)."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and "\\" not in name and "\x00" not in name and all(p not in ("", ".", "..") for p in parts)


def _ignore_paths(root: Path, sig_path: Path) -> list[str]:
    """The defaults, plus the signature file itself when it lies inside the folder (as model_signing does)."""
    sig = Path(sig_path).resolve()
    inside = [sig.relative_to(root).as_posix()] if is_within(sig, root) else []
    return sorted(set(DEFAULT_IGNORE) | set(inside))


def default_sig_path(folder: Path) -> Path:
    resolved = Path(folder).resolve()
    return resolved.with_name(resolved.name + ".sig")


def _signature_ok(public_key, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, message, ecdsa_for(public_key))
    except InvalidSignature:
        return False
    return True
