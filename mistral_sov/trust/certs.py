"""The OMS certificate method (§4.1): a signing key with an X.509 certificate from the organisation's own CA.

The bundle carries `verificationMaterial.x509CertificateChain`: the leaf, then the intermediates up to (not
necessarily including) the root, each base64 DER, as `model_signing sign certificate` writes it. The verifier
brings the roots it trusts (`--ca`); nothing in the bundle is trusted on its own.

When is the leaf checked? OMS §8.2: "The leaf certificate MUST be within its validity period." A key/certificate
bundle holds no trusted time (the statement has no date, `timestampVerificationData` is optional), so the only time
a verifier can vouch for is its own clock: the chain is validated *now* (RFC 5280 §6.1.3 for every certificate of
the path). A caller that has checked an RFC 3161 timestamp over the signature may pass that time instead (`at`).
model_signing 1.1.1 validates at the leaf's own notBefore, so it never sees an expired leaf: msov is stricter on
purpose, as the spec asks.

Path validation is cryptography's (`x509.verification`, RFC 5280 with CA/B Forum WebPKI profile), with its
extension policies changed where the WebPKI profile is about TLS and not about code signing:
- the leaf's extendedKeyUsage must allow codeSigning (the client verifier's default asks for clientAuth), and so
  must a CA's when it has one (EKU chaining, as Windows and webpki do);
- the leaf needs no subjectAltName (a TLS name) and no authorityKeyIdentifier (a chain-building hint whose absence
  weakens nothing: issuer names and signatures are still checked);
- the leaf may be a CA certificate (the spec's own test vector signs with one; its key is as trusted either way).
Everything else stays: signatures, issuer/subject links, basicConstraints cA and pathLen on every CA, keyUsage
keyCertSign on every CA, validity of every certificate, minimum key sizes, permitted signature algorithms.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError, VerificationError
from .hashing import printable
from .keys import HASH_FOR_CURVE, key_hint

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class CertificateSigner:
    """A Signer (signer.py) whose key comes with a certificate: signs with `inner`, names the certificate chain.

    Refuses at once, before any file is hashed, what would make every verification fail: a certificate for
    another key, one not for signing, one out of its validity period, a chain whose links do not hold.
    """

    def __init__(self, inner, cert: Path, chain: tuple[Path, ...] = ()):
        self.inner = inner
        self.public_key = inner.public_key
        self.path = getattr(inner, "path", None)  # sign_folder keeps a key file out of the folder it signs
        self.cert_path = Path(cert)
        # a "fullchain" file (leaf then its issuers) is as good as --cert LEAF --chain REST
        leaf, *rest = load_certificates(self.cert_path, "--cert")
        extra = rest + [c for path in chain for c in load_certificates(Path(path), "--chain")]
        where = str(self.cert_path)
        if key_hint(leaf.public_key()) != key_hint(self.public_key):
            raise InputError(f"{where}: certifies another key (key hint {key_hint(leaf.public_key())[:16]}…), not "
                             f"the signing key (key hint {key_hint(self.public_key)[:16]}…).",
                             hint="Pass the certificate issued for this --key.")
        problem = signing_use_problem(leaf)
        if problem:
            raise InputError(f"{where}: the certificate {_name(leaf.subject)} cannot sign models: {problem}.",
                             hint="Have the CA issue a certificate with keyUsage digitalSignature and extended key "
                                  "usage codeSigning.")
        now = datetime.now(timezone.utc)
        for cert_, label in [(leaf, "certificate")] + [(c, "chain certificate") for c in extra]:
            expired = _validity_problem(cert_, now)
            if expired:
                raise InputError(f"{where}: the {label} {_name(cert_.subject)} {expired}; a signature made with it "
                                 f"would fail verification.", hint="Renew the certificate with the CA.")
        self.chain = [leaf, *_order_chain(leaf, extra, where)]

    def sign(self, message: bytes) -> bytes:
        return self.inner.sign(message)

    def material(self) -> dict:
        return {"x509CertificateChain": {"certificates": [{"rawBytes": base64.b64encode(_der(c)).decode("ascii")}
                                                          for c in self.chain]}}

    def describe(self) -> dict:
        leaf = self.chain[0]
        inner = self.inner.describe()
        return {"method": "certificate", "subject": leaf.subject.rfc4514_string(),
                "issuers": [leaf.issuer.rfc4514_string()] + [c.issuer.rfc4514_string() for c in self.chain[1:]],
                "key_hint": key_hint(self.public_key), "key_source": inner.get("method"), "key": inner.get("key"),
                "cert": str(self.cert_path), "certificate_fingerprint": certificate_fingerprint(leaf),
                "not_before": _iso(leaf.not_valid_before_utc), "not_after": _iso(leaf.not_valid_after_utc)}


def verify_chain(chain_der: list[bytes], roots: tuple[Path, ...] | list[Path], *, at: datetime | None = None,
                 where: str = "the bundle") -> tuple[object, dict]:
    """Path validation of a bundle's certificate chain (leaf first) to one of the `roots` (--ca files), at `at`
    (default: now; see the module docstring). Returns the leaf's public key and the signer report
    {"method", "subject", "issuers", "root", "path", "hint", "fingerprint", "certificate_fingerprint", "curve",
    "not_before", "not_after", "validated_at"}. Raises VerificationError naming what failed, prefixed by `where`."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import verification

    def fail(message: str, hint: str | None = None) -> VerificationError:
        return VerificationError(f"{where}: {message}.", hint=hint)

    if not roots:
        raise fail("is certificate-signed and no --ca root was given to check it against")
    if not chain_der:
        raise fail("the x509CertificateChain holds no certificate")
    certs = []
    for i, der in enumerate(chain_der):
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise fail(f"certificate #{i} of the x509CertificateChain is not a DER X.509 certificate") from None
    anchors = [(path, c) for path in roots for c in load_certificates(Path(path), "--ca")]
    leaf, pool = certs[0], certs[1:]
    at = at or datetime.now(timezone.utc)
    subject = _name(leaf.subject)

    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in HASH_FOR_CURVE:
        raise fail(f"the leaf certificate {subject} holds a {_key_kind(key)} key; OMS signatures are checked with "
                   f"ECDSA P-256, P-384 or P-521 keys only")
    problem = signing_use_problem(leaf)
    if problem:
        raise fail(f"the leaf certificate {subject} is not for signing: {problem}")
    if any(_der(leaf) == _der(root) for _, root in anchors):
        raise fail(f"the leaf certificate {subject} is itself a --ca root: a certificate that vouches for itself "
                   f"is a pinned key, not a chain to a CA (OMS §8.2 validates the chain against the trusted root CA)",
                   hint="Sign with a certificate your CA issued, or use the key method (msov verify --key).")
    expired = _validity_problem(leaf, at)
    if expired:
        raise fail(f"the leaf certificate {subject} {expired}, and OMS §8.2 requires it to be within its validity "
                   f"period (checked at {_iso(at)}, no trusted timestamp says the signature is older)")

    eku_required = _eku_validator(ee=True)
    ee_policy = (verification.ExtensionPolicy.webpki_defaults_ee()
                 .may_be_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, eku_required)
                 .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
                 .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.NON_CRITICAL, None)
                 .may_be_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, None))
    ca_policy = (verification.ExtensionPolicy.webpki_defaults_ca()
                 .may_be_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, _eku_validator(ee=False))
                 .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.NON_CRITICAL, None))
    verifier = (verification.PolicyBuilder().store(verification.Store([c for _, c in anchors])).time(at)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy).build_client_verifier())
    try:
        path = verifier.verify(leaf, pool).chain
    except verification.VerificationError as exc:
        message, hint = _diagnose(leaf, pool, [c for _, c in anchors], at, str(exc))
        raise fail(message, hint) from None

    anchor = path[-1]
    root_path = next(p for p, c in anchors if _der(c) == _der(anchor))
    hint = key_hint(key)
    return key, {"method": "certificate", "subject": leaf.subject.rfc4514_string(),
                 "issuers": [c.subject.rfc4514_string() for c in path[1:]], "root": anchor.subject.rfc4514_string(),
                 "path": str(root_path), "hint": hint, "fingerprint": f"SHA256:{hint}",
                 "certificate_fingerprint": certificate_fingerprint(leaf), "curve": key.curve.name,
                 "not_before": _iso(leaf.not_valid_before_utc), "not_after": _iso(leaf.not_valid_after_utc),
                 "validated_at": _iso(at)}


def chain_from_bundle(material: dict, where: str = "the bundle") -> list[bytes]:
    """The DER certificates of `verificationMaterial.x509CertificateChain`, leaf first (the bundle is untrusted)."""
    chain = material.get("x509CertificateChain") if isinstance(material, dict) else None
    items = chain.get("certificates") if isinstance(chain, dict) else None
    if not isinstance(items, list) or not items:
        raise VerificationError(f"{where}: x509CertificateChain.certificates must be a non-empty list.")
    out = []
    for i, item in enumerate(items):
        raw = item.get("rawBytes") if isinstance(item, dict) else None
        try:
            out.append(base64.b64decode(raw, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise VerificationError(f"{where}: x509CertificateChain.certificates[{i}].rawBytes is not valid "
                                    f"base64.") from None
    return out


def leaf_claims(chain_der: list[bytes]) -> dict:
    """{"subject", "key_hint"} of a chain's leaf, nothing verified (for listings)."""
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(chain_der[0])
    return {"subject": leaf.subject.rfc4514_string(), "key_hint": key_hint(leaf.public_key())}


def load_certificates(path: Path, option: str) -> list:
    """Every certificate of a PEM file (one or more), or of a DER file (one)."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{option} {path}: no such file.") from None
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot be read ({exc.strerror}).") from None
    try:
        if _PEM_CERT in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise InputError(f"{option} {path}: not a PEM or DER X.509 certificate.") from None


def signing_use_problem(cert) -> str | None:
    """Why `cert` may not sign a model, or None. model_signing asks for keyUsage digitalSignature *or* extended key
    usage codeSigning; RFC 5280 §4.2.1.3/§4.2.1.12 add that an extension, when present, restricts the key, so a
    keyUsage without digitalSignature, or an extendedKeyUsage without codeSigning, is refused as well."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    usage = _extension(cert, x509.KeyUsage)
    purposes = _extension(cert, x509.ExtendedKeyUsage)
    allowed = (ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    if usage is not None and not usage.digital_signature:
        return "its keyUsage lacks digitalSignature"
    if purposes is not None and not any(p in allowed for p in purposes):
        return f"its extendedKeyUsage ({', '.join(_oid_name(p) for p in purposes)}) lacks codeSigning"
    if usage is None and (purposes is None or ExtendedKeyUsageOID.CODE_SIGNING not in purposes):
        return "it has neither keyUsage digitalSignature nor extended key usage codeSigning"
    return None


def certificate_fingerprint(cert) -> str:
    """SHA256 of the DER certificate, as `openssl x509 -fingerprint -sha256` shows it (without colons)."""
    return "SHA256:" + hashlib.sha256(_der(cert)).hexdigest()


def _eku_validator(*, ee: bool):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    allowed = (ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)

    def check(policy, cert, purposes) -> None:
        if ee:
            problem = signing_use_problem(cert)
            if problem:
                raise ValueError(problem)
        elif purposes is not None and not any(p in allowed for p in purposes):
            raise ValueError(f"the CA certificate {_name(cert.subject)} restricts its extendedKeyUsage to "
                             f"{', '.join(_oid_name(p) for p in purposes)}, without codeSigning")

    return check


def _order_chain(leaf, extra: list, where: str) -> list:
    """`extra` as the leaf's issuers in order (each signed the one before); the top one need not be a root.
    A certificate that is no link of that chain is refused: it would be shipped for nothing, or hide a mistake."""
    ordered, current, left = [], leaf, list(extra)
    while left:
        issuer = next((c for c in left if c.subject == current.issuer and _signed_by(current, c)), None)
        if issuer is None:
            break
        ordered.append(issuer)
        left.remove(issuer)
        if issuer.subject == issuer.issuer:  # a self-signed root ends the chain
            break
        current = issuer
    if left:
        named = [c for c in left if c.subject == current.issuer]
        if named:
            raise InputError(f"{where}: the chain certificate {_name(named[0].subject)} has the name of the issuer "
                             f"of {_name(current.subject)} but did not sign it.")
        raise InputError(f"{where}: the chain certificate {_name(left[0].subject)} is no link of the chain above "
                         f"{_name(leaf.subject)} (which continues at {_name(current.issuer)}).",
                         hint="Pass with --chain the intermediates that issued the leaf, and only those.")
    return ordered


def _diagnose(leaf, pool: list, anchors: list, at: datetime, error: str) -> tuple[str, str | None]:
    """(message, hint): why cryptography found no valid path, in one sentence naming the certificate at fault."""
    roots = ", ".join(_name(c.subject) for c in anchors)
    current, seen = leaf, []
    while True:
        named_roots = [c for c in anchors if c.subject == current.issuer]
        if named_roots:
            if not any(_signed_by(current, c) for c in named_roots):
                message = (f"the certificate chain does not lead to any --ca root: {_name(current.subject)} names "
                           f"{_name(current.issuer)} as its issuer, but the --ca certificate of that name did not "
                           f"sign it (another CA with the same name)")
                return message, None
            break
        parents = [c for c in pool if c.subject == current.issuer and c not in seen and c is not current]
        if not parents and current is leaf:
            message = (f"the leaf certificate {_name(leaf.subject)} was issued by {_name(leaf.issuer)}, which is "
                       f"neither in the bundle nor among the --ca roots ({roots}): an intermediate certificate is "
                       f"missing from the bundle, or the --ca is the wrong one")
            return message, ("The signer passes intermediates with `msov sign --chain INT.crt`; pass the root of "
                             "that chain with --ca.")
        if not parents:
            message = (f"the certificate chain does not lead to any --ca root: it ends at {_name(current.subject)}, "
                       f"issued by {_name(current.issuer)}, which is not among the --ca roots ({roots})")
            return message, "Verify with the root CA certificate that issued this chain (--ca ROOT.crt)."
        parent = next((c for c in parents if _signed_by(current, c)), None)
        if parent is None:
            message = (f"the certificate chain is broken: {_name(current.subject)} names {_name(current.issuer)} "
                       f"as its issuer, but the bundle's certificate of that name did not sign it")
            return message, None
        seen.append(current)
        current = parent
    for cert in [*seen, current, *[c for c in anchors if c.subject == current.issuer]]:
        problem = _validity_problem(cert, at)
        if problem:
            return f"the chain certificate {_name(cert.subject)} {problem} (checked at {_iso(at)})", None
    return f"the certificate chain to the --ca root is not valid: {_clean(error)}", None


def _clean(error: str) -> str:
    """cryptography's message without its prefixes, naming the certificate by its subject."""
    import re

    for prefix in ("validation failed: ", "candidates exhausted: ", "Python extension validator failed: ",
                   "ValueError: "):
        error = error.replace(prefix, "")
    return re.sub(r"\s*\(encountered processing <Certificate\(subject=<Name\((.*?)\)>, \.\.\.\)>\)",
                  lambda m: f" (at '{printable(m.group(1))}')", error)


def _validity_problem(cert, at: datetime) -> str | None:
    if at > cert.not_valid_after_utc:
        return f"expired on {_when(cert.not_valid_after_utc)}"
    if at < cert.not_valid_before_utc:
        return f"is not valid before {_when(cert.not_valid_before_utc)}"
    return None


def _signed_by(cert, issuer) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):  # ValueError/TypeError: names or key kinds that differ
        return False
    return True


def _extension(cert, kind):
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _der(cert) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def _name(name) -> str:
    return "'" + printable(name.rfc4514_string()) + "'"


def _oid_name(oid) -> str:
    return getattr(oid, "_name", None) or oid.dotted_string


def _key_kind(key) -> str:
    return type(key).__name__.replace("PublicKey", "").lstrip("_") or "unknown"


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _when(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
