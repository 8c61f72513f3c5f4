"""RFC 3161 timestamps from an on-prem timestamp authority: the optional `timestampVerificationData` of OMS §4.1.

What is timestamped is what Sigstore timestamps: the signature bytes of the DSSE envelope, so a timestamp proves
the signature existed at its time. The bundle stores the DER TimeStampResp (status and token), as
sigstore_common.proto#RFC3161SignedTimestamp says ("DER encoded TimeStampResponse") and as sigstore-python and
model_signing write and read it (`rfc3161_client.decode_timestamp_response`), so their verifiers read ours.

The TSA is a URL the user gives: msov sends it one digest and follows no redirect and no proxy, so the request
reaches exactly that host. Parsing and CMS/chain checks are rfc3161-client's (the library Sigstore uses); the one
thing it cannot take is a token whose certificate SET is not in DER order, which `openssl ts` writes whenever it
includes more than the TSA certificate (OpenSSL encodes PKCS#7 certificates as an unsorted SEQUENCE OF). Those
certificates are not signed, so msov puts them in DER order (asn1crypto) before parsing; nothing signed changes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from datetime import datetime, timezone
from pathlib import Path

from ..errors import EnvironmentRefused, InputError, VerificationError

QUERY_TYPE, REPLY_TYPE = "application/timestamp-query", "application/timestamp-reply"
_MAX_REPLY = 1 << 20  # a TimeStampResp with a long chain is a few KiB; more is not a TSA talking
MAX_TIMESTAMPS = 32  # sigstore-python's limit per bundle
_HASHES = {"2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512"}
_STATUS = {0: "granted", 1: "grantedWithMods", 2: "rejection", 3: "waiting", 4: "revocationWarning",
           5: "revocationNotification"}
_HINT_URL = ("Check the URL and that the timestamp authority is up; for https with a private CA, point "
             "SSL_CERT_FILE at its certificate.")


def request_timestamp(url: str, signature: bytes, *, timeout: float = 10.0) -> bytes:
    """Ask the TSA at URL for a timestamp over sha256(signature) (random nonce, certReq); returns the DER
    TimeStampResp as stored in `signedTimestamp`. Only checks that the answer is the one asked for; its TSA
    signature and chain are checked by `verify_timestamp`, against roots the verifier trusts."""
    rfc = _rfc3161()
    if not url.lower().startswith(("http://", "https://")):
        raise InputError(f"{url}: a timestamp authority is reached over http:// or https:// only.")
    request = (rfc.TimestampRequestBuilder().data(signature).hash_algorithm(rfc.HashAlgorithm.SHA256)
               .nonce(nonce=True).cert_request(cert_request=True).build())
    body = _post(url, request.as_bytes(), timeout)
    try:
        response = rfc.decode_timestamp_response(_normalise(body))
    except ValueError:
        raise InputError(f"{url}: the answer is not an RFC 3161 timestamp response.", hint=_HINT_URL) from None
    if response.status not in (0, 1):
        text = "; ".join(response.status_string)
        raise InputError(f"{url}: the timestamp authority refused the request (status "
                         f"{_STATUS.get(response.status, response.status)}{': ' + text if text else ''}).")
    try:
        info = response.tst_info
        certificates = response.signed_data.certificates
    except ValueError:
        raise InputError(f"{url}: the timestamp authority granted the request but sent no readable token.") \
            from None
    if info.nonce != request.nonce:
        raise InputError(f"{url}: the timestamp's nonce is not the one msov sent; the answer may be a replay.")
    if (info.message_imprint.hash_algorithm.dotted_string != "2.16.840.1.101.3.4.2.1"
            or info.message_imprint.message != hashlib.sha256(signature).digest()):
        raise InputError(f"{url}: the timestamp authority stamped other bytes than the signature msov sent.")
    if not certificates:
        raise InputError(f"{url}: the timestamp carries no TSA certificate although msov asked for one "
                         f"(certReq); it could not be verified later.")
    return response.as_bytes()


def verify_timestamp(token: bytes, signature: bytes, roots: list[Path]) -> datetime:
    """Check that TOKEN (a DER TimeStampResp, or a bare TimeStampToken) stamps this signature, is signed by a TSA
    certificate with the timeStamping EKU that chains to one of ROOTS (PEM files) at the stamped time; returns
    that time (UTC)."""
    rfc = _rfc3161()
    try:
        response = rfc.decode_timestamp_response(_normalise(token))
    except ValueError:
        raise VerificationError("the timestamp is not an RFC 3161 timestamp response or token.") from None
    if response.status not in (0, 1):
        raise VerificationError(f"the timestamp records a refusal by its authority "
                                f"({_STATUS.get(response.status, response.status)}), not a time.")
    try:
        imprint = response.tst_info.message_imprint
    except ValueError:
        raise VerificationError("the timestamp holds no readable token.") from None
    hash_name = _HASHES.get(imprint.hash_algorithm.dotted_string)
    if hash_name is None:
        raise VerificationError(f"the timestamp hashes with {imprint.hash_algorithm.dotted_string}; msov checks "
                                f"sha256, sha384 and sha512 imprints.")
    # Sigstore stamps the signature with sha512 by default, msov with sha256: both are the same proof.
    if not hmac.compare_digest(imprint.message, hashlib.new(hash_name, signature).digest()):
        raise VerificationError("the timestamp is over other bytes than this signature: it was taken for another "
                                "signature, or the signature was changed since.")
    anchors = _load_roots(roots)
    names = ", ".join(str(path) for path in roots)
    builder = rfc.VerifierBuilder()
    for certificate in anchors:
        builder = builder.add_root_certificate(certificate)
    try:
        builder.build().verify(response, imprint.message)
    except rfc.VerificationError as exc:
        detail = str(exc)
        if "EKU" in detail:
            raise VerificationError(f"the timestamp's signer is not a timestamp authority: {detail}",
                                    hint="RFC 3161 §2.3: its certificate needs a critical extendedKeyUsage of "
                                         "timeStamping.") from None
        # rfc3161-client passes on OpenSSL's error stack: its chain verdict, or the signature's.
        chain = re.search(r'Verify error: ([^"]+)', detail)
        if chain:
            raise VerificationError(f"the timestamp is not signed by a TSA that chains to {names} "
                                    f"({chain.group(1)}).",
                                    hint="Pass the root certificate of the TSA that stamped it (--tsa-ca).") \
                from None
        if "signature failure" in detail or "digest failure" in detail:
            raise VerificationError("the timestamp's TSA signature does not match its contents: the token was "
                                    "altered after the TSA signed it.") from None
        reasons = "; ".join(re.findall(r'reason: "([^"]+)"', detail)) or detail
        raise VerificationError(f"the timestamp does not verify against {names}: {reasons}") from None
    when = response.tst_info.gen_time
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def timestamp_material(token: bytes) -> dict:
    """`verificationMaterial.timestampVerificationData` holding one timestamp."""
    return {"rfc3161Timestamps": [{"signedTimestamp": base64.b64encode(token).decode("ascii")}]}


def read_timestamps(bundle: dict) -> list[bytes]:
    """The DER timestamps of a bundle, [] when it has none."""
    material = bundle.get("verificationMaterial") if isinstance(bundle, dict) else None
    data = material.get("timestampVerificationData") if isinstance(material, dict) else None
    if data is None:
        return []
    entries = data.get("rfc3161Timestamps") if isinstance(data, dict) else ()
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise VerificationError("timestampVerificationData.rfc3161Timestamps is not a list.")
    if len(entries) > MAX_TIMESTAMPS:
        raise VerificationError(f"the bundle holds {len(entries)} timestamps; more than {MAX_TIMESTAMPS} is refused.")
    tokens = []
    for index, entry in enumerate(entries):
        value = entry.get("signedTimestamp") if isinstance(entry, dict) else None
        if not isinstance(value, str) or not value:
            raise VerificationError(f"rfc3161Timestamps[{index}] has no signedTimestamp string.")
        # Protobuf JSON (the bundle's encoding) allows standard or URL-safe base64, padded or not.
        text = value.strip().replace("-", "+").replace("_", "/")
        try:
            tokens.append(base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
        except (binascii.Error, ValueError):
            raise VerificationError(f"rfc3161Timestamps[{index}].signedTimestamp is not base64.") from None
    return tokens


def _post(url: str, query: bytes, timeout: float) -> bytes:
    import http.client
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # urllib then raises the 3xx as an HTTPError

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    request = urllib.request.Request(url, data=query, method="POST",
                                     headers={"Content-Type": QUERY_TYPE, "Accept": REPLY_TYPE})
    try:
        with opener.open(request, timeout=timeout) as answer:
            body = answer.read(_MAX_REPLY + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        hint = "msov follows no redirect: give the TSA's own URL." if 300 <= exc.code < 400 else _HINT_URL
        raise InputError(f"{url}: the timestamp authority answered HTTP {exc.code} {exc.reason}.", hint=hint) \
            from None
    except (OSError, http.client.HTTPException) as exc:  # URLError and TimeoutError are OSErrors
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            raise InputError(f"{url}: the timestamp authority did not answer within {timeout:g} s.",
                             hint=_HINT_URL) from None
        raise InputError(f"{url}: cannot reach the timestamp authority ({reason or type(reason).__name__}).",
                         hint=_HINT_URL) from None
    if len(body) > _MAX_REPLY:
        raise InputError(f"{url}: the answer is over {_MAX_REPLY >> 10} KiB; not a timestamp response.")
    return body


def _normalise(der: bytes) -> bytes:
    """DER as rfc3161-client parses it: a bare TimeStampToken gets the 'granted' TimeStampResp around it, and the
    token's certificates are put in DER SET OF order. Anything unparseable is returned as is, for the caller's
    parser to reject."""
    from asn1crypto import cms, core, tsp

    der = bytes(der)
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native == "signed_data":
            der = tsp.TimeStampResp({"status": {"status": "granted"}, "time_stamp_token": info}).dump()
    except (ValueError, TypeError, KeyError):
        pass
    try:
        response = tsp.TimeStampResp.load(der, strict=True)
        token = response["time_stamp_token"]
        if isinstance(token, core.Void):
            return der
        certificates = token["content"]["certificates"]
        original = certificates.contents
        ordered = b"".join(sorted(certificate.dump() for certificate in certificates))
    except (ValueError, TypeError, KeyError, AttributeError):
        return der
    # Same bytes in another order: lengths do not move, so swapping the one span leaves the rest untouched.
    if not original or ordered == original or der.count(original) != 1:
        return der
    return der.replace(original, ordered)


def _load_roots(roots: list[Path]) -> list:
    from cryptography import x509

    if not roots:
        raise VerificationError("the bundle holds a timestamp but no TSA root certificate was given to check it.",
                                hint="Pass the root certificate of the timestamp authority (--tsa-ca ROOT.pem).")
    anchors = []
    for path in roots:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read the TSA root certificate ({exc.strerror or exc}).") from None
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise InputError(f"{path}: not a PEM certificate.",
                             hint="Pass the timestamp authority's root CA certificate, PEM-encoded.") from None
        anchors.extend(cert for cert in found if cert not in anchors)
    return anchors


def _rfc3161():
    try:
        import asn1crypto  # noqa: F401  (for _normalise)
        import rfc3161_client
    except ImportError as exc:
        raise EnvironmentRefused(f"RFC 3161 timestamps need the {exc.name} package, which is not installed.",
                                 hint="pip install rfc3161-client asn1crypto (both come with sigstore).") from None
    return rfc3161_client
