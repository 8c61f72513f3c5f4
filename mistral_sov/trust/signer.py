"""Who signs: a Signer holds (or reaches) a private key and says how a verifier finds its public key.

Every signing path (`msov sign`, a run's `output.sign_key`, `export --key`) signs through this one protocol, so a
key file, a key inside an HSM (pkcs11.py) and a key with an X.509 certificate (certs.py) write the same bundle
apart from `verificationMaterial`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .keys import HASH_FOR_CURVE, check_signing_key, key_hint, load_private_key


class Signer(Protocol):
    public_key: object  # cryptography EllipticCurvePublicKey

    def sign(self, message: bytes) -> bytes:
        """A DER-encoded ECDSA signature over `message`, with the curve's hash (see keys.HASH_FOR_CURVE)."""

    def material(self) -> dict:
        """The bundle's verificationMaterial, less tlogEntries and timestamps: how a verifier finds the key."""

    def describe(self) -> dict:
        """{"method": "key" | "pkcs11" | "certificate", "key_hint": ..., ...} for reports; no secret in it."""


class KeyFileSigner:
    """An ECDSA private key in a PEM file (mode 0600; its passphrase from $MSOV_KEY_PASSPHRASE)."""

    def __init__(self, path: Path, passphrase: bytes | None = None):
        self.path = Path(path)
        self._key = load_private_key(self.path, passphrase)
        self.public_key = self._key.public_key()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, ecdsa_for(self.public_key))

    def material(self) -> dict:
        return {"publicKey": {"hint": key_hint(self.public_key)}}

    def describe(self) -> dict:
        return {"method": "key", "key_hint": key_hint(self.public_key), "key": str(self.path)}


def open_signer(key: str | Path, *, passphrase: bytes | None = None, cert: Path | None = None,
                chain: tuple[Path, ...] = ()) -> Signer:
    """`--key PATH` or `--key pkcs11:...` (RFC 7512), with `--cert LEAF [--chain INTERMEDIATE]...` the
    certificate method instead of the key method."""
    if is_pkcs11(key):
        from .pkcs11 import Pkcs11Signer

        signer = Pkcs11Signer(str(key))
    else:
        signer = KeyFileSigner(Path(key), passphrase)
    if cert is not None:
        from .certs import CertificateSigner

        signer = CertificateSigner(signer, Path(cert), tuple(Path(c) for c in chain))
    return signer


def check_signer(key: str | Path, *, outside: tuple[Path, ...] = ()) -> str:
    """Reach the signing key now (passphrase or PIN included) so a long job fails at its start, not its end;
    returns its key hint. A key file inside a folder msov writes or replaces is refused (keys.check_signing_key)."""
    if is_pkcs11(key):
        from .pkcs11 import Pkcs11Signer

        with Pkcs11Signer(str(key)) as signer:
            return signer.key_hint
    return check_signing_key(Path(key), outside=outside)


def is_pkcs11(key) -> bool:
    """An RFC 7512 URI (the scheme is case-insensitive) rather than a key file's path."""
    return isinstance(key, (str, Path)) and str(key)[:7].lower() == "pkcs11:"


def ecdsa_for(public_key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.ECDSA(getattr(hashes, HASH_FOR_CURVE[public_key.curve.name])())
