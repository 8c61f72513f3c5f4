"""Signing keys: ECDSA key pairs for OMS signatures, made, loaded and kept where they cannot leak.

A private key is written with mode 0600 from creation, never overwritten, never put inside an msov output folder
(where it could be shipped or signed with the output); its passphrase comes from the environment.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from ..errors import InputError, MsovError, UsageError
from .hashing import write_atomic

PASSPHRASE_ENV = "MSOV_KEY_PASSPHRASE"
# ssh's rule: a private key others can read is refused, since it may already be copied; this lets a user who
# knows better (a container where every file is 0644) go on, knowingly.
ALLOW_OPEN_KEY_ENV = "MSOV_ALLOW_OPEN_KEY"
# PEM armour of every private key kind: PKCS#8 (plain and ENCRYPTED), SEC1 EC, RSA, DSA, OpenSSH, PGP.
_PRIVATE_PEM = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# Markers are looked for in a whole small file, and in the head and tail of a large one (weights stay unread).
_SNIFF_WHOLE, _SNIFF_EDGE, _DER_MAX = 1 << 20, 1 << 16, 1 << 14
CURVES = {"P-256": "SECP256R1", "P-384": "SECP384R1", "P-521": "SECP521R1"}
# Each curve signs with its matching hash, as model_signing does (OMS algorithm registry).
HASH_FOR_CURVE = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}
# Files whose presence marks a folder (or one of its parents) as msov output: no private key may be put there.
_OUTPUT_MARKERS = ("run.json", "msov/provenance.json", "adapter_config.json")


def passphrase_from_env() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def generate_keypair(base: Path, *, curve: str = "P-256", passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write BASE.pem (private, PKCS#8, mode 0600 from creation, encrypted when a passphrase is given) and
    BASE.pub (SubjectPublicKeyInfo PEM). Refuses to overwrite either, or to put a key inside msov output."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if curve not in CURVES:
        raise UsageError(f"--curve {curve}: expected one of {', '.join(CURVES)}.")
    base = Path(base)
    private_path, public_path = base.with_name(base.name + ".pem"), base.with_name(base.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path}: already exists; msov never overwrites a key.",
                             hint="Choose another --out, or move the old key pair away first.")
    _refuse_inside_output(private_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(getattr(ec, CURVES[curve])())
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    write_atomic(private_path, private_pem, mode=0o600)
    write_atomic(public_path, _public_pem(key.public_key()), mode=0o644)
    return private_path, public_path


def check_signing_key(key_path: Path, *, outside: tuple[Path, ...] = (), passphrase: bytes | None = None) -> str:
    """Load the key now (passphrase included) and refuse one kept inside a folder that will be replaced or
    published; returns its key hint. For commands that sign at the end of a long job (signer.check_signer also
    takes a key in an HSM)."""
    resolved = Path(key_path).resolve()
    for folder in outside:
        if is_within(resolved, Path(folder).resolve()):
            raise InputError(f"{key_path}: the private key lies inside {folder}, which msov writes or replaces; "
                             f"it would be lost or shipped with the output.",
                             hint="Keep keys outside every output folder.")
    return key_hint(load_private_key(key_path, passphrase).public_key())


def load_private_key(path: Path, passphrase: bytes | None = None):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_key_file(path, "private key")
    _refuse_open_key(Path(path))
    passphrase = passphrase if passphrase is not None else passphrase_from_env()
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:  # encrypted but no passphrase, or a passphrase for an unencrypted key
        if passphrase:
            key = serialization.load_pem_private_key(data, None)
        else:
            raise InputError(f"{path}: the private key is encrypted and no passphrase was given.",
                             hint=f"Set {PASSPHRASE_ENV} in the environment.") from None
    except ValueError:
        raise InputError(f"{path}: not a PEM private key, or the passphrase is wrong.",
                         hint=f"The passphrase comes from {PASSPHRASE_ENV}; `msov keygen` makes a key pair.") \
            from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in HASH_FOR_CURVE:
        raise InputError(f"{path}: OMS key signing needs an ECDSA P-256, P-384 or P-521 key.",
                         hint="`msov keygen --out KEYBASE` makes one.")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise InputError(f"{path}: not a PEM public key.",
                         hint="Pass the signer's .pub file (`msov keygen` writes KEYBASE.pub).") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in HASH_FOR_CURVE:
        raise InputError(f"{path}: not an ECDSA P-256/P-384/P-521 public key.")
    return key


def key_hint(public_key) -> str:
    """OMS/model_signing key hint: hex sha256 of the public key's canonical SubjectPublicKeyInfo PEM bytes."""
    return hashlib.sha256(_public_pem(public_key)).hexdigest()


def _public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _refuse_inside_output(private_path: Path) -> None:
    for parent in private_path.resolve().parents:
        marker = next((m for m in _OUTPUT_MARKERS if (parent / m).is_file()), None)
        if marker:
            raise InputError(f"{private_path}: would lie inside an msov output folder ({parent / marker} exists); "
                             f"a private key there could be shipped or signed with the output.",
                             hint="Keep keys in a folder of their own, e.g. ~/.msov/keys/.")


def _refuse_open_key(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077 and not os.environ.get(ALLOW_OPEN_KEY_ENV):
        raise InputError(f"{path}: the private key is readable by other users (mode {mode:04o}); it may already "
                         f"have been copied, so msov will not sign with it.",
                         hint=f"`chmod 600 {path}` (and consider a new key pair); set {ALLOW_OPEN_KEY_ENV}=1 to "
                              f"use it anyway.")


def refuse_secrets(folder: Path, *, key: Path | None = None, error: type[MsovError] = InputError) -> None:
    """The one check before anything of `folder` is copied, published or signed: no symbolic link anywhere (its
    target could be any file of the machine), no private key of any kind, and no copy of the `key` file (any
    name, hard links included)."""
    root = Path(folder)
    key_bytes = Path(key).read_bytes() if key is not None and Path(key).is_file() else None
    if root.is_symlink():
        raise error(f"{root}: is a symbolic link; msov reads the real folder only.")
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(directory) / name
            if path.is_symlink():
                raise error(f"{path}: is a symbolic link; what it points to would be published in its place.",
                            hint="Remove the link (or replace it with a copy of a file meant to be shipped).")
            if name in files:
                _refuse_key_file(path, key_bytes, error)


def _refuse_key_file(path: Path, key_bytes: bytes | None, error: type[MsovError]) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if key_bytes is not None and size == len(key_bytes) and handle.read() == key_bytes:
            raise error(f"{path}: is a copy of the signing key; it would be shipped with the output.",
                        hint="Keep keys outside every folder that is exported or signed.")
        handle.seek(0)
        head = handle.read(_SNIFF_WHOLE if size <= _SNIFF_WHOLE else _SNIFF_EDGE)
        if size > _SNIFF_WHOLE:
            handle.seek(size - _SNIFF_EDGE)
            head += b"\n" + handle.read()
    if _PRIVATE_PEM.search(head) or (size <= _DER_MAX and _is_der_private_key(head)):
        raise error(f"{path}: holds a private key; msov never publishes or signs one.",
                    hint="Move the key out of the folder; keys belong outside every output.")


def _is_der_private_key(data: bytes) -> bool:
    """A binary (DER) private key has no armour; cryptography tells it from any other small file."""
    from cryptography.hazmat.primitives import serialization

    if not data.startswith(b"\x30"):  # every DER key is an ASN.1 SEQUENCE
        return False
    try:
        serialization.load_der_private_key(data, None)
    except TypeError:  # encrypted: a key all the same
        return True
    except Exception:  # noqa: BLE001 - not a key, whatever the parser says
        return False
    return True
