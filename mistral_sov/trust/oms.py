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
import os
import re
import stat
from pathlib import Path

from ..errors import InputError, VerificationError
from .hashing import (DEFAULT_IGNORE, FileEntry, compare_manifests, hash_files, is_ignored, list_files, manifest_of,
                      printable, sort_key, subject_digest, write_atomic)
from .keys import is_within, key_hint, load_public_key, refuse_secrets
from .provenance import PROVENANCE_PATH, STATEMENT_TYPE, check_provenance, parse_provenance
from .signer import Signer, ecdsa_for, is_pkcs11, open_signer

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# model_signing 0.2.0's statement: one subject per file, no serialization. Verified, never written (OMS §11.2).
PREDICATE_TYPE_V01 = "https://model_signing/Digests/v0.1"
# The two spellings sigstore_bundle.proto gives a v0.3 bundle; msov writes the first, as model_signing does.
_MEDIA_TYPES = (BUNDLE_MEDIA_TYPE, "application/vnd.dev.sigstore.bundle+json;version=0.3")
_HEX64 = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: no trailing newline slips through


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed (lengths in bytes)."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_folder(folder: Path, key: "Path | Signer", *, sig_path: Path | None = None,
                passphrase: bytes | None = None, known: dict[str, str] | None = None,
                ignore: tuple[str, ...] = (), tsa: str | None = None) -> dict:
    """Sign every file of `folder`; write the OMS bundle to `sig_path` (default: FOLDER.sig beside it).

    `ignore`: paths the signer leaves out (OMS §6.2.1): each an exact path relative to the folder ('cache' is
    <folder>/cache and everything below it, never sub/cache), or an absolute path inside the folder; recorded in
    the predicate's serialization.ignore_paths with the defaults, so a verifier sees what was not signed.

    `key`: a private key file, or any Signer (signer.py: an HSM key, a key with its certificate). The passphrase
    of an encrypted key file, when not given, comes from $MSOV_KEY_PASSPHRASE (never from argv).
    `known` ({relative name: sha256}) is for a caller that hashed the very bytes it just wrote (the merge): those
    files are signed without being read again. Verification never trusts it: verify_folder re-hashes every file.
    Returns {"sig", "subject_digest", "files", "key_hint"}.
    """
    folder = Path(folder)
    root = folder.resolve()
    key_path = (None if is_pkcs11(key) else Path(key)) if isinstance(key, (str, Path)) else getattr(key, "path", None)
    if key_path is not None and is_within(key_path.resolve(), root):
        raise InputError(f"{key_path}: the private key lies inside the folder to sign; it would be signed into "
                         f"the output and shipped with it.", hint="Keep keys outside every output folder.")
    signer = open_signer(key, passphrase=passphrase) if isinstance(key, (str, Path)) else key
    sig_path = Path(sig_path) if sig_path else default_sig_path(folder)
    refuse_secrets(folder, key=key_path)

    # 1. the manifest: every file, streamed and hashed in parallel (the signature itself when it lies inside)
    ignore, known = _ignore_paths(root, sig_path, ignore), known or {}
    if is_ignored(PROVENANCE_PATH, ignore) and (root / PROVENANCE_PATH).is_file():
        raise InputError(f"{folder}: an ignore path covers {PROVENANCE_PATH}, the record of how these weights were "
                         f"made; msov always signs it with them.", hint="Drop that --ignore path.")
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
    material = {**signer.material(), "tlogEntries": []}
    if tsa:  # OMS §4.1's optional timestamp: an on-prem RFC 3161 authority vouches the signature existed by now
        from .timestamp import request_timestamp, timestamp_material

        material["timestampVerificationData"] = timestamp_material(request_timestamp(tsa, signature))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii"), "keyid": ""}],
        },
    }
    sig_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(sig_path, (json.dumps(bundle, indent=2) + "\n").encode("utf-8"), mode=0o644)
    return {"sig": str(sig_path), "subject_digest": statement["subject"][0]["digest"]["sha256"],
            "files": len(files), "key_hint": hint, "signer": signer.describe(), "ignore_paths": ignore}


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
                  ca: tuple[Path, ...] = (), ignore: tuple[str, ...] = (), ignore_unsigned: bool = False,
                  tsa_ca: tuple[Path, ...] = ()) -> dict:
    """Check `folder` against its signature: key method with the public key at `pub_path`, certificate method
    with the CA roots `ca` (certs.py). `ignore`: paths the verifier itself chooses to skip (OMS §6.2.1; a bundle
    alone never widens what is skipped); `ignore_unsigned`: files on disk the signature does not list are not an
    error (OMS §8.5).

    Raises VerificationError naming the first thing wrong (bundle, key, signature, statement) or every file that
    differs (changed, added, removed, renamed). Returns a report: files, subject digest, signer, provenance, and
    `unsigned`: files there that the signature does not list (only ever non-empty with `ignore_unsigned`).
    """
    folder = Path(folder)
    root = folder.resolve()
    if not folder.is_dir():
        raise VerificationError(f"{folder}: no such folder to verify.")
    sig_path = Path(sig_path) if sig_path else default_sig_path(folder)

    # 1. the bundle, who signed it and the signature: nothing in the payload is trusted before this passes
    bundle = _read_bundle(sig_path)
    payload, signer = _check_envelope(bundle, sig_path, pub_path, ca, tsa_ca)

    # 2. the signed statement: types, resources, subject digest, and ignore paths: a bundle may record only paths
    #    this verification skips anyway (the defaults, the signature inside the folder, `ignore`), never widen them
    skipped = _ignore_paths(root, sig_path, ignore)
    statement = _check_statement(payload, sig_path, allowed_ignore=skipped, name=root.name)
    expected = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    recorded = statement["predicate"]["serialization"].get("ignore_paths", [])

    # 3. the folder as it is on disk, against the signed list. A skipped path excuses only files the signature does
    #    not list: a signed file is hashed wherever it lies (OMS §8.4), so skipping can never hide a change to it
    on_disk = list_files(folder, ignore=skipped, error=VerificationError)
    seen = {f.name for f in on_disk}
    on_disk += _signed_files_under(folder, [n for n in expected if n not in seen and is_ignored(n, skipped)])
    unsigned = [f.name for f in on_disk if f.name not in expected]
    checked = [f for f in on_disk if f.name in expected] if ignore_unsigned else on_disk  # OMS §8.5
    actual = dict(zip((f.name for f in checked), hash_files([f.path for f in checked])))
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
        "ignore_paths": recorded,
        "unsigned": unsigned,
        "key": signer,
        "provenance": provenance,
    }


def _check_envelope(bundle: dict, sig_path: Path, pub_path, ca: tuple[Path, ...],
                    tsa_ca: tuple[Path, ...] = ()) -> tuple[bytes, dict]:
    """The DSSE signature checked with the signer's key, found as the bundle's verificationMaterial says (OMS §4.1,
    §8.2): `publicKey`, the key at `pub_path`; `x509CertificateChain`, the leaf's key once its chain is validated
    against the `ca` roots (certs.py). Returns the payload and who signed: {"method", "path", "hint",
    "fingerprint", "curve"}, plus "subject", "issuers", "root", "not_after"... for the certificate method."""
    envelope = bundle["dsseEnvelope"]
    material = bundle.get("verificationMaterial")
    kinds = [k for k in ("publicKey", "x509CertificateChain", "certificate") if isinstance(material, dict)
             and k in material]
    if len(kinds) != 1:  # a oneof in sigstore_bundle.proto: two kinds would leave the verifier to pick one
        raise VerificationError(f"{sig_path}: verificationMaterial must hold exactly one of publicKey (key method) "
                                f"and x509CertificateChain (certificate method); it holds "
                                f"{' and '.join(kinds) or 'neither'}.")
    if kinds[0] == "certificate":  # OMS §11.1: this field means the sigstore method, never the certificate one
        raise VerificationError(f"{sig_path}: uses the sigstore method (a Fulcio certificate and a transparency "
                                f"log), which msov does not verify offline.",
                                hint="Verify it with `model_signing verify sigstore`.")
    payload = _b64(envelope.get("payload"), sig_path, "dsseEnvelope.payload")
    signature = _b64(envelope["signatures"][0].get("sig"), sig_path, "dsseEnvelope.signatures[0].sig")
    signed_at = _check_timestamp(material, signature, sig_path, tsa_ca)
    if kinds[0] == "x509CertificateChain":
        from .certs import chain_from_bundle, leaf_claims, verify_chain

        chain = chain_from_bundle(material, str(sig_path))
        if not ca:
            try:
                by = f" (its certificate names {leaf_claims(chain)['subject']!r})"
            except ValueError:
                by = ""
            raise VerificationError(f"{sig_path}: is certificate-signed{by}, not key-signed: it is checked "
                                    f"against the root CA that issued its certificate, not against a public key.",
                                    hint="Pass --ca ROOT.crt (repeatable) instead of --key.")
        # with a trusted timestamp the certificate is checked when it signed, not now (OMS §8.2 and §4.1)
        public_key, signer = verify_chain(chain, ca, at=signed_at.get("time"), where=str(sig_path))
        made_by = f"the certificate of {signer['subject']!r}"
    else:
        claimed = _get(material, "publicKey", "hint")
        if pub_path is None:
            named = f" (key hint {str(claimed)[:16]}…)" if claimed else ""
            raise VerificationError(f"{sig_path}: is key-signed{named}, not certificate-signed: it is checked "
                                    f"against the signer's public key, not against a --ca root.",
                                    hint="Pass --key SIGNER.pub instead of --ca.")
        # a public key object is for the caller that derived it from the private key it holds (export)
        public_key = load_public_key(Path(pub_path)) if isinstance(pub_path, (str, Path)) else pub_path
        hint = key_hint(public_key)
        if claimed and claimed != hint:
            raise VerificationError(f"{sig_path}: signed by another key (key hint {str(claimed)[:16]}…), not by "
                                    f"{pub_path} (key hint {hint[:16]}…).",
                                    hint="Verify with the signer's public key.")
        signer = {"method": "key", "path": str(pub_path), "hint": hint, "fingerprint": f"SHA256:{hint}",
                  "curve": public_key.curve.name}
        made_by = str(pub_path)
    if not _signature_ok(public_key, signature, pae(envelope["payloadType"], payload)):
        raise VerificationError(f"{sig_path}: the signature does not verify with {made_by}: the signature or the "
                                f"signed payload was changed, or another key made it.")
    if "time" in signed_at:
        signer = {**signer, "signed_at": signed_at["time"].isoformat(), "timestamp": "verified",
                  "tsa_ca": signed_at["tsa"]}
    elif signed_at:
        signer = {**signer, "timestamp": "present, not checked (pass --tsa-ca)"}
    return payload, signer


def _check_timestamp(material: dict, signature: bytes, sig_path: Path, tsa_ca: tuple[Path, ...]) -> dict:
    """{"time": datetime, "tsa": root path} when a timestamp was checked against the `tsa_ca` roots; {"present":
    True} when the bundle has one nobody asked to check; {} when it has none."""
    from .timestamp import read_timestamps

    tokens = read_timestamps({"verificationMaterial": material})
    if not tsa_ca:
        return {"present": True} if tokens else {}
    if not tokens:
        raise VerificationError(f"{sig_path}: holds no RFC 3161 timestamp, and --tsa-ca asks for one.",
                                hint="Sign with --tsa URL, or verify without --tsa-ca.")
    from .timestamp import verify_timestamp

    return {"time": verify_timestamp(tokens[0], signature, list(tsa_ca)), "tsa": [str(p) for p in tsa_ca]}


def _check_statement(payload: bytes, sig_path: Path, *, allowed_ignore: list[str], name: str = "") -> dict:
    """The signed in-toto Statement, checked (OMS §8.3) and returned in its v1.0 shape: a model_signing 0.2.0
    statement (Digests/v0.1) comes back with its files as resources, in msov's order, and `name` as subject.
    Ignore paths it records must all be in `allowed_ignore`: a bundle never decides on its own what goes unchecked.
    """
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
    if statement.get("predicateType") == PREDICATE_TYPE_V01:
        return _legacy_statement(statement, name, bad)
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise bad(f"has predicateType {statement.get('predicateType')!r}, expected {PREDICATE_TYPE}")
    subjects, predicate = statement.get("subject"), statement.get("predicate")
    if not isinstance(subjects, list) or len(subjects) != 1 or not _HEX64.fullmatch(str(_get(subjects[0], "digest",
                                                                                          "sha256"))):
        raise bad("must have exactly one subject with a sha256 digest")
    if not isinstance(predicate, dict) or set(predicate) != {"serialization", "resources"}:
        raise bad("predicate must hold exactly 'serialization' and 'resources'")
    serialization = predicate["serialization"]
    if not isinstance(serialization, dict):
        raise bad("serialization must be an object")
    if serialization.get("method") == "shards":  # OMS §6.3.2: a verifier without shards says so
        raise bad("hashes files in shards (serialization method 'shards'), which msov does not verify; sign the "
                  "folder with the 'files' method")
    if serialization.get("hash_type") not in ("sha256", None):
        raise bad(f"hashes with {serialization.get('hash_type')!r}; msov verifies sha256 digests only")
    if serialization.get("allow_symlinks") is True:
        raise bad("was made following symbolic links (allow_symlinks: true); msov verifies folders of regular "
                  "files only")
    wanted = {"method": "files", "hash_type": "sha256", "allow_symlinks": False}
    if any(serialization.get(k) != v for k, v in wanted.items()) or set(serialization) - {*wanted, "ignore_paths"}:
        raise bad(f"serialization must be {wanted} (plus ignore_paths), got {serialization}")
    ignore = serialization.get("ignore_paths", [])  # absent before model_signing 1.1 (OMS §11.2)
    if not isinstance(ignore, list) or not all(isinstance(p, str) and p.strip("/") for p in ignore):
        raise bad("ignore_paths must be a list of paths")
    extra = [p for p in ignore if not is_ignored(p.rstrip("/"), allowed_ignore)]
    if extra:
        shown = ", ".join(map(printable, extra))
        raise VerificationError(f"{sig_path}: the signed statement ignores paths beyond the defaults ({shown}) that "
                                f"this verification was not asked to skip: files there would go unchecked.",
                                hint=f"If you accept that those files are not checked, pass --ignore for each "
                                     f"({shown}); a signature alone never decides what is skipped.")
    resources = _check_resources(predicate["resources"], bad)
    recomputed = subject_digest(r["digest"] for r in resources)
    if recomputed != subjects[0]["digest"]["sha256"]:
        raise bad(f"is inconsistent: the subject digest is {subjects[0]['digest']['sha256'][:16]}… but the "
                  f"listed files hash to {recomputed[:16]}…")
    return statement


def _check_resources(resources, bad) -> list[dict]:
    """Each file named once, as a plain relative path, with a sha256; fields OMS does not use are let be (§5.2.1)."""
    if not isinstance(resources, list):
        raise bad("resources must be a list")
    if not resources:
        raise bad("lists no files (OMS §5.2.1: a signature covers at least one)")
    seen = set()
    for item in resources:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not _safe_name(name):
            raise bad(f"lists a path that is not a plain relative path inside the folder: {name!r}")
        if item.get("algorithm") != "sha256" or not _HEX64.fullmatch(str(item.get("digest", ""))):
            raise bad(f"lists {printable(name)} without a sha256 digest")
        if name in seen:
            raise bad(f"lists {printable(name)} twice")
        seen.add(name)
    return resources


def _legacy_statement(statement: dict, name: str, bad) -> dict:
    """model_signing 0.2.0 put each file in `subject` ({name, digest.sha256, annotations.actual_hash_algorithm:
    file-sha256}) and nothing in the predicate; it ignored no path. Returned as a v1.0 statement so that it is
    checked as one; its subject digest is computed here (it has none) in msov's resource order."""
    subjects = statement.get("subject")
    if not isinstance(subjects, list):
        raise bad("(model_signing 0.2.0 format) must list its files as subjects")
    resources = []
    for item in subjects:
        algorithm = _get(item, "annotations", "actual_hash_algorithm") or "sha256"
        if algorithm not in ("file-sha256", "sha256"):
            raise bad(f"(model_signing 0.2.0 format) hashes {printable(str(_get(item, 'name')))} with "
                      f"{algorithm!r}; msov verifies whole-file sha256 digests only")
        resources.append({"name": _get(item, "name"), "algorithm": "sha256", "digest": _get(item, "digest", "sha256")})
    resources = sorted(_check_resources(resources, bad), key=lambda r: sort_key(r["name"]))
    return {"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE_V01,
            "subject": [{"name": name, "digest": {"sha256": subject_digest(r["digest"] for r in resources)}}],
            "predicate": {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False},
                          "resources": resources}}


def bundle_claims(sig_path: Path) -> dict:
    """{"method", "signer", "key_hint", "subject_digest"} a signature bundle claims, nothing verified ({} when
    unreadable): enough to list a registry entry's signer, or to see that its folder changed since signing.
    `signer`: "SHA256:<key hint>" for the key method, the certificate's subject for the certificate method (whose
    `key_hint` is the leaf certificate's key)."""
    try:
        bundle = json.loads(Path(sig_path).read_bytes())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        digest = statement["subject"][0]["digest"]["sha256"]
        if statement.get("predicateType") == PREDICATE_TYPE_V01:  # one subject per file: the folder's is computed
            digest = _legacy_statement(statement, "", ValueError)["subject"][0]["digest"]["sha256"]
        material = bundle["verificationMaterial"]
        if "x509CertificateChain" in material:
            from .certs import chain_from_bundle, leaf_claims

            leaf = leaf_claims(chain_from_bundle(material))
            return {"method": "certificate", "signer": leaf["subject"], "key_hint": leaf["key_hint"],
                    "subject": leaf["subject"], "subject_digest": digest}
        hint = material["publicKey"].get("hint") or _raw_key_hint(material["publicKey"]["rawBytes"])
        return {"method": "key", "signer": f"SHA256:{hint}", "key_hint": hint, "subject_digest": digest}
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError, VerificationError):
        return {}


def _read_bundle(sig_path: Path) -> dict:
    if not sig_path.is_file():
        raise VerificationError(f"{sig_path}: no signature there.",
                                hint="Pass --sig PATH when the signature is not FOLDER.sig beside the folder.")
    data = sig_path.read_bytes()
    if not data.strip():
        raise VerificationError(f"{sig_path}: is empty, not a signature bundle (an interrupted copy?).")
    try:
        bundle = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"{sig_path}: not a valid signature bundle (not JSON: {exc.msg} at byte {exc.pos}; "
                                f"truncated?).") from None
    except RecursionError:  # a hostile bundle of nested brackets, not a signature
        raise VerificationError(f"{sig_path}: not a valid signature bundle (JSON nested too deeply).") from None
    if not isinstance(bundle, dict) or bundle.get("mediaType") not in _MEDIA_TYPES:
        got = bundle.get("mediaType") if isinstance(bundle, dict) else type(bundle).__name__
        raise VerificationError(f"{sig_path}: not a Sigstore bundle v0.3 (mediaType {got!r}, expected "
                                f"{BUNDLE_MEDIA_TYPE}).")
    envelope, material = bundle.get("dsseEnvelope"), bundle.get("verificationMaterial")
    if not isinstance(envelope, dict):
        raise VerificationError(f"{sig_path}: the bundle holds no DSSE envelope.")
    if not isinstance(material, dict):
        raise VerificationError(f"{sig_path}: the bundle holds no verificationMaterial, which says how the signer's "
                                f"key is found (OMS §4.1).")
    if "certificate" in material and not (isinstance(material.get("tlogEntries"), list) and material["tlogEntries"]):
        raise VerificationError(f"{sig_path}: a sigstore-method bundle (verificationMaterial.certificate) without "
                                f"the transparency log entries that method requires (tlogEntries, OMS §4.1).")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise VerificationError(f"{sig_path}: envelope payloadType {envelope.get('payloadType')!r}, expected "
                                f"{PAYLOAD_TYPE}.")
    signatures = envelope.get("signatures")
    if signatures == []:
        raise VerificationError(f"{sig_path}: the envelope carries no signature.")
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


def _ignore_paths(root: Path, sig_path: Path, user: "tuple[str | os.PathLike, ...]" = ()) -> list[str]:
    """The defaults, the signature file itself when it lies inside the folder (as model_signing does), and the
    paths a user chose (OMS §6.2.1), each as a path relative to the folder."""
    sig = Path(sig_path).resolve()
    inside = [sig.relative_to(root).as_posix()] if is_within(sig, root) else []
    user = (user,) if isinstance(user, (str, os.PathLike)) else user  # one path, not its characters
    return sorted(set(DEFAULT_IGNORE) | set(inside) | {_user_ignore_path(root, p) for p in user})


def _user_ignore_path(root: Path, path) -> str:
    """An exact path relative to the folder, or an absolute path inside it (what model_signing's CLI and the
    conformance adapters pass). No glob, no '..': a pattern would skip more than the user can see (§6.2.1)."""
    text = os.fspath(path)
    if os.path.isabs(text):
        resolved = Path(text).resolve()
        if resolved == root or not is_within(resolved, root):
            raise InputError(f"ignore path {printable(text)}: lies outside the folder {root}; an ignore path names "
                             f"a file or folder inside it.")
        return resolved.relative_to(root).as_posix()
    name = text.removeprefix("./").rstrip("/")
    if not _safe_name(name) or any(c in name for c in "*?[") or printable(name) != name:
        raise InputError(f"ignore path {printable(text)!r}: not a plain path relative to the folder; an ignore path "
                         f"is an exact file or folder name like 'cache' or 'logs/run.txt', with '/' between parts and "
                         f"no '*', '?', '[', '.' or '..' part (OMS §6.2.1).")
    return name


def _signed_files_under(folder: Path, names: list[str]) -> list[FileEntry]:
    """Signed files lying under a skipped path, which list_files did not walk: each is found without following a
    link on the way (a link could lead out of the folder); a missing one is left for compare_manifests to name."""
    found = []
    for name in names:
        path, parts = Path(folder), name.split("/")
        for depth, part in enumerate(parts, 1):
            path = path / part
            try:
                info = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(info.st_mode):
                raise VerificationError(f"{folder}: '{printable('/'.join(parts[:depth]))}' is a symbolic link; a "
                                        f"signed folder holds regular files only.")
            if depth == len(parts):
                if not stat.S_ISREG(info.st_mode):
                    raise VerificationError(f"{folder}: '{printable(name)}' is signed as a file but is not a regular "
                                            f"file.")
                found.append(FileEntry(name, path, info.st_size))
    return found


def _raw_key_hint(raw: str) -> str:
    """The key hint of a publicKey written as rawBytes (model_signing before 1.1, OMS §11.2): a base64 PEM key."""
    from cryptography.hazmat.primitives import serialization

    return key_hint(serialization.load_pem_public_key(base64.b64decode(raw, validate=True)))


def default_sig_path(folder: Path) -> Path:
    resolved = Path(folder).resolve()
    return resolved.with_name(resolved.name + ".sig")


def _signature_ok(public_key, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    for candidate in (message, _pae_v020(message)):
        if candidate is None:
            continue
        try:
            public_key.verify(signature, candidate, ecdsa_for(public_key))
        except InvalidSignature:
            continue
        return True
    return False


def _pae_v020(message: bytes) -> bytes | None:
    """model_signing 0.2.0 signed a mangled PAE: 'DSSEV1 28 <type> <length> ' and the payload as Python writes a
    bytes object (b'...' with escapes). Its verifiers since accept it (sign_sigstore_pb.pae_compat); msov does
    so only for a statement in 0.2.0's own format (Digests/v0.1), so that no v1.0 statement passes that way."""
    head = b"DSSEv1 %d %s " % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode("ascii"))
    if not message.startswith(head):
        return None
    length, _, payload = message[len(head):].partition(b" ")
    try:
        legacy = json.loads(payload).get("predicateType") == PREDICATE_TYPE_V01
    except (ValueError, AttributeError, RecursionError):
        return None
    return b"DSSEV1 %s %s %s" % (head[7:-1], length, repr(payload).encode("ascii")) if legacy else None
