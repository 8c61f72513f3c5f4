"""Signing keys that never leave a hardware token: ECDSA through PKCS#11, named by an RFC 7512 `pkcs11:` URI.

The private key is generated inside the token (sensitive, never extractable) and only ever used there: msov asks
the token for a signature and gets r||s back, nothing else. Its public half is read from the token's public key
object, checked against a probe signature, and is what verifiers get.

The module library comes from the URI's `module-path` or $MSOV_PKCS11_MODULE; the user PIN from `pin-source`
(a file), a `pin-value` (accepted, though anything in argv can be read by other local users) or $MSOV_PKCS11_PIN.
No PIN ever appears in an error message. python-pkcs11 (extra `hsm`) is imported only when a token is used.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from ..errors import InputError, MsovError, UsageError
from .keys import CURVES, HASH_FOR_CURVE, key_hint

MODULE_ENV = "MSOV_PKCS11_MODULE"
PIN_ENV = "MSOV_PKCS11_PIN"
PATH_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "library-manufacturer", "library-description",
                   "library-version", "object", "type", "id", "slot-manufacturer", "slot-description", "slot-id")
QUERY_ATTRIBUTES = ("pin-source", "pin-value", "module-name", "module-path")
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
_SCHEME = "pkcs11:"
# RFC 7512 section 2.3: unreserved (RFC 3986) plus pk11-res-avail, with "&" added in the path and "/", "?", "|"
# in the query; anything else must come percent-encoded.
_RES_AVAIL = ":[]@!$'()*+,="
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~" + re.escape(_RES_AVAIL + "&") + "]*")
_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~" + re.escape(_RES_AVAIL + "/?|") + "]*")
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # pk11-v-attr-nm-char: vendor attribute names
_PCT_BAD = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HINT_URI = "Write it as pkcs11:token=LABEL;object=KEYLABEL (RFC 7512), percent-encoding any other character."
_HINT_LIST = "`softhsm2-util --show-slots` or `pkcs11-tool --module MODULE -L` lists the tokens; `pkcs11-tool " \
             "--module MODULE -O --login` the objects of one."
# pkcs11.util.ec names these as asn1crypto does; cryptography names them the same
_SUPPORTED_CURVES = tuple(HASH_FOR_CURVE)


def parse_uri(text: str) -> dict:
    """RFC 7512 `pkcs11:` URI -> {attribute: value}, path and query attributes together, percent-decoded.

    `id` is bytes, `slot-id` an int, every other value a str (UTF-8); vendor attributes are kept as they are
    named. Raises InputError naming the part that is malformed; a PIN is never quoted in it.
    """
    parsed: dict = {}
    for section, name, raw in _split(text):
        chars = _PATH_CHARS if section == "path" else _QUERY_CHARS
        # a PIN holding an unencoded "&" splits into pieces that look like attributes: quote none of the query
        secret = name == "pin-value" or section == "query" and _has_pin_value(text)
        where = f"the {section} attribute '{name}'" if not secret or name == "pin-value" else f"a {section} attribute"
        if not _NAME.fullmatch(name):
            what = "the query holds a malformed attribute name (an unencoded '&' inside the PIN?)" if secret \
                else f"'{_shown(name)}' is not an attribute name (letters, digits, '-' and '_' only)"
            raise InputError(f"PKCS#11 URI: {what}.", hint=_HINT_URI)
        if name in parsed:
            raise InputError(f"PKCS#11 URI: {where} appears twice; RFC 7512 allows each once.", hint=_HINT_URI)
        if section == "path" and name in QUERY_ATTRIBUTES or section == "query" and name in PATH_ATTRIBUTES:
            other = "query (after '?')" if section == "path" else "path (before '?')"
            raise InputError(f"PKCS#11 URI: '{name}' belongs in the {other}.", hint=_HINT_URI)
        bad_pct = _PCT_BAD.search(raw)
        if bad_pct:
            raise InputError(f"PKCS#11 URI: {where} holds a '%' not followed by two hex digits.", hint=_HINT_URI)
        stray = chars.sub("", raw.replace("%", ""))
        if stray:
            shown = "" if secret else f" ('{_shown(stray[0])}')"
            raise InputError(f"PKCS#11 URI: {where} holds a character that must be percent-encoded{shown}.",
                             hint=_HINT_URI)
        value = unquote_to_bytes(raw)
        if name != "id":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"PKCS#11 URI: {where} is not UTF-8 once percent-decoded.", hint=_HINT_URI) \
                    from None
        parsed[name] = _typed(name, value)
    if "pin-value" in parsed and "pin-source" in parsed:
        raise InputError("PKCS#11 URI: both pin-value and pin-source are given; which PIN is meant is unclear.",
                         hint=f"Keep pin-source (a file), or neither and set {PIN_ENV}.")
    return parsed


def redact_uri(text: str) -> str:
    """The URI as given, less any pin-value: what may be logged, shown or written into a report."""
    head, _, query = text.strip().partition("?")
    kept = [item for item in query.split("&") if item and item.partition("=")[0] != "pin-value"] if query else []
    return head + ("?" + "&".join(kept) if kept else "")


def module_path(uri: dict) -> Path:
    """The PKCS#11 module library: the URI's module-path, else $MSOV_PKCS11_MODULE."""
    value = uri.get("module-path") or os.environ.get(MODULE_ENV)
    if not value:
        named = f" (module-name={uri['module-name']} alone cannot be resolved)" if uri.get("module-name") else ""
        raise InputError(f"PKCS#11: no module library is named{named}; msov loads the one it is told to.",
                         hint=f"Add ?module-path=/path/to/module.so to the URI, or set {MODULE_ENV} "
                              f"(SoftHSM2: /usr/lib/softhsm/libsofthsm2.so).")
    path = Path(value)
    if not path.is_file():
        what = "is a folder, not the module's library file" if path.is_dir() else "no such file"
        raise InputError(f"PKCS#11 module {path}: {what}.",
                         hint="Give the full path of the vendor's PKCS#11 library (.so).")
    return path


def user_pin(uri: dict) -> str:
    """The user PIN: pin-value, else the file pin-source names, else $MSOV_PKCS11_PIN."""
    if "pin-value" in uri:
        return uri["pin-value"]
    source = uri.get("pin-source")
    if source is not None:
        path = _pin_file(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"PKCS#11 pin-source {path}: cannot read it ({exc.strerror or type(exc).__name__}).") \
                from None
        try:
            pin = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"PKCS#11 pin-source {path}: the file is not UTF-8 text.") from None
        # editors and `echo` end the file with a newline that is no part of the PIN
        return pin.removesuffix("\n").removesuffix("\r") if pin.endswith("\n") else pin
    pin = os.environ.get(PIN_ENV)
    if not pin:
        raise InputError("PKCS#11: the token needs its user PIN and none was given.",
                         hint=f"Set {PIN_ENV}, or add ?pin-source=file:/path/to/pinfile to the URI.")
    return pin


class Pkcs11Signer:
    """An ECDSA key inside a PKCS#11 token, as msov's Signer: public_key, sign(), material(), describe(), close().

    One read-only session stays open (and logged in) until close(); use it as a context manager.
    """

    def __init__(self, uri: str):
        import pkcs11

        self.uri = redact_uri(uri)
        attrs = parse_uri(uri)
        if attrs.get("type", "private") != "private":
            raise InputError(f"{self.uri}: type={attrs['type']} names no private key; signing needs one.",
                             hint="Use type=private, or leave type out.")
        _refuse_unknown_path_attributes(uri, self.uri)
        pin = user_pin(attrs)
        self._login = _Login(_find_token(attrs), attrs, pin, rw=False)
        session = self._login.session
        try:
            self._key = _one_object(session, attrs, pkcs11.ObjectClass.PRIVATE_KEY, self.uri)
            if self._key.key_type != pkcs11.KeyType.EC:
                raise InputError(f"{self.uri}: the key is {self._key.key_type.name}, not an EC key; OMS signing "
                                 f"needs ECDSA P-256 or P-384.", hint="`msov keygen --pkcs11 URI` makes one.")
            # a key that demands the PIN for every signature (CKA_ALWAYS_AUTHENTICATE) gets it each time
            self._pin = pin if _flag(self._key, pkcs11.Attribute.ALWAYS_AUTHENTICATE) else None
            self._curve = _curve_of(self._key[pkcs11.Attribute.EC_PARAMS], self.uri)
            self._mechanism, self._prehash = _mechanism(self._login.token, self._curve)
            self.public_key = _matching_public_key(session, self._key, self._curve, self.sign, self.uri)
        except pkcs11.PKCS11Error as exc:
            self.close()
            raise _token_error(exc, self.uri) from None
        except BaseException:
            self.close()
            raise
        self.key_hint = key_hint(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """DER ECDSA signature over `message`, with the curve's hash, made by the token."""
        import pkcs11
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        if self._login is None:
            raise MsovError(f"{self.uri}: the PKCS#11 session is closed.")
        # the token hashes when it offers CKM_ECDSA_SHA256/384/512; SoftHSM2 2.6 does not, so there Python hashes
        # and the token signs the digest (CKM_ECDSA): the digest is no secret, the private key stays in the token
        data = hashlib.new(self._prehash, message).digest() if self._prehash else message
        try:
            raw = self._key.sign(data, mechanism=self._mechanism, pin=self._pin)
        except pkcs11.PKCS11Error as exc:
            raise _token_error(exc, self.uri) from None
        half = len(raw) // 2  # PKCS#11 returns r||s, each as wide as the curve order; OMS wants DER
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def material(self) -> dict:
        return {"publicKey": {"hint": self.key_hint}}

    def describe(self) -> dict:
        return {"method": "pkcs11", "key_hint": self.key_hint, "uri": self.uri}

    def close(self) -> None:
        login, self._login = getattr(self, "_login", None), None
        if login is not None:
            login.close()

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def generate_keypair(uri: str, *, curve: str = "P-256") -> dict:
    """Make an EC key pair inside the token the URI names: the private key sensitive, never extractable, for
    signing only. Label from `object`, id from `id` (16 random bytes when absent). Refuses when an object with
    that label or id exists: a key is never overwritten. Returns {"uri", "key_hint", "curve", "public_pem"}."""
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    if curve not in CURVES:
        raise UsageError(f"--curve {curve}: expected one of {', '.join(CURVES)}.")
    shown = redact_uri(uri)
    attrs = parse_uri(uri)
    if "object" not in attrs:
        raise InputError(f"{shown}: names no key (object=LABEL); the new key needs a label to be found by.",
                         hint="e.g. pkcs11:token=msov;object=signer")
    if attrs.get("type", "private") not in ("private", "public"):
        raise InputError(f"{shown}: type={attrs['type']} is not a key pair.", hint="Leave type out.")
    _refuse_unknown_path_attributes(uri, shown)
    key_id = attrs.get("id") or os.urandom(16)
    login = _Login(_find_token(attrs), attrs, user_pin(attrs), rw=True)
    try:
        session = login.session
        for what, search in (("label", {pkcs11.Attribute.LABEL: attrs["object"]}),
                             ("id", {pkcs11.Attribute.ID: key_id})):
            if next(iter(session.get_objects(search)), None) is not None:
                raise InputError(f"{shown}: the token already holds an object with this {what}; msov never "
                                 f"overwrites a key.", hint="Choose another object= (and id=), or delete the old "
                                                            "key with the token's own tool first.")
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[curve].lower())},
            local=True)
        public, _private = params.generate_keypair(
            store=True, label=attrs["object"], id=key_id,
            capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY,
            public_template={pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.PRIVATE: False,
                             pkcs11.Attribute.VERIFY: True},
            private_template={pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.PRIVATE: True,
                              pkcs11.Attribute.SENSITIVE: True, pkcs11.Attribute.EXTRACTABLE: False,
                              pkcs11.Attribute.SIGN: True, pkcs11.Attribute.DERIVE: False})
        public_key = _public_key_of(public, CURVES[curve].lower(), shown)
    except pkcs11.PKCS11Error as exc:
        raise _token_error(exc, shown) from None
    finally:
        login.close()
    return {"uri": _key_uri(uri, key_id), "key_hint": key_hint(public_key), "curve": curve,
            "public_pem": _pem(public_key)}


# -- URI pieces ---------------------------------------------------------------------------------------------------

def _split(text: str) -> list[tuple[str, str, str]]:
    """[(section, name, raw value)] of a pkcs11: URI, nothing decoded yet."""
    if not isinstance(text, str) or not text.strip().lower().startswith(_SCHEME):
        raise InputError("not a PKCS#11 URI: it must start with 'pkcs11:'.", hint=_HINT_URI)
    rest = text.strip()[len(_SCHEME):]
    if "#" in rest:
        raise InputError("PKCS#11 URI: '#' is not allowed (a URI fragment); percent-encode it as %23.",
                         hint=_HINT_URI)
    path, _, query = rest.partition("?")
    items = []
    for section, part, sep in (("path", path, ";"), ("query", query, "&")):
        if not part:
            continue
        for item in part.split(sep):
            name, equals, raw = item.partition("=")
            if not item or not equals:
                what = "an empty attribute (two separators in a row, or one at the end)" if not item \
                    else "an attribute with no '=value' (an unencoded '&' inside the PIN?)" \
                    if section == "query" and _has_pin_value(text) else f"'{_shown(name)}' with no '=value'"
                raise InputError(f"PKCS#11 URI: the {section} holds {what}.", hint=_HINT_URI)
            items.append((section, name, raw))
    return items


def _refuse_unknown_path_attributes(uri: str, shown: str) -> None:
    """A vendor attribute in the path narrows the match in a way msov cannot check: refuse rather than match a
    key it may not name (one in the query only tunes the consumer and is ignored)."""
    unknown = [name for section, name, _ in _split(uri) if section == "path" and name not in PATH_ATTRIBUTES]
    if unknown:
        raise InputError(f"{shown}: the path attribute '{_shown(unknown[0])}' is not one msov can match.",
                         hint=f"Name the key with {', '.join(PATH_ATTRIBUTES[:3])}, object, id, slot-id ... only.")


def _typed(name: str, value):
    if name == "type" and value not in OBJECT_TYPES:
        raise InputError(f"PKCS#11 URI: type={_shown(value)} is none of {', '.join(OBJECT_TYPES)}.", hint=_HINT_URI)
    if name == "slot-id":
        if not value.isascii() or not value.isdigit():
            raise InputError(f"PKCS#11 URI: slot-id={_shown(value)} is not a decimal number.", hint=_HINT_URI)
        return int(value)
    if name == "library-version" and not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        raise InputError(f"PKCS#11 URI: library-version={_shown(value)} is not MAJOR[.MINOR].", hint=_HINT_URI)
    return value


def _has_pin_value(text: str) -> bool:
    return any(item.startswith("pin-value=") for item in text.partition("?")[2].split("&"))


def _shown(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")[:40]


def _pin_file(source: str) -> Path:
    """pin-source: a file: URI (file:/p, file:///p, file://localhost/p) or a plain path."""
    if source.startswith("file:"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"PKCS#11 pin-source {source}: a file on another host cannot be read.")
        return Path(parts.path)
    if source.startswith("|") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", source):
        raise InputError("PKCS#11 pin-source: only a file (file:/path/to/pinfile) is supported.",
                         hint=f"Or set {PIN_ENV} in the environment.")
    return Path(source)


def _key_uri(uri: str, key_id: bytes) -> str:
    """The URI that names the new key: the one given, less any pin-value, with its id when it had none."""
    head, _, query = redact_uri(uri).partition("?")
    if not any(name == "id" for section, name, _ in _split(uri) if section == "path"):
        head += (";" if head.rstrip().lower() != _SCHEME else "") + "id=" + "".join(f"%{b:02X}" for b in key_id)
    return head + ("?" + query if query else "")


# -- the token ---------------------------------------------------------------------------------------------------

_LOGINS_LOCK = threading.Lock()
# PKCS#11 logs an application in per token, not per session: a second C_Login fails and the first C_Logout logs
# every session out. So one login session per (module, slot) is held while any msov session of it is open.
_LOGINS: dict[tuple[str, int], list] = {}


class _Login:
    """A session on `token`, logged in as the user through the shared login of that token."""

    def __init__(self, token, attrs: dict, pin: str, *, rw: bool):
        import pkcs11

        self.token, self._key = token, (str(module_path(attrs)), token.slot.slot_id)
        digest = hashlib.sha256(pin.encode("utf-8")).digest()
        with _LOGINS_LOCK:
            held = _LOGINS.get(self._key)
            try:
                if held is None:
                    held = [token.open(user_pin=pin), digest, 0]
                elif not hmac.compare_digest(held[1], digest):
                    raise pkcs11.PinIncorrect()
                self.session = token.open(rw=rw)
            except pkcs11.PKCS11Error as exc:
                if held is not None and held[2] == 0:
                    _close_quietly(held[0])
                raise _token_error(exc, f"PKCS#11 token '{token.label}'") from None
            held[2] += 1
            _LOGINS[self._key] = held

    def close(self) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        _close_quietly(session)
        with _LOGINS_LOCK:
            held = _LOGINS.get(self._key)
            if held is not None:
                held[2] -= 1
                if held[2] <= 0:
                    del _LOGINS[self._key]
                    _close_quietly(held[0])


def _close_quietly(session) -> None:
    import pkcs11

    try:
        session.close()
    except pkcs11.PKCS11Error:  # a token pulled out: its sessions are gone already
        pass


def _find_token(attrs: dict):
    import pkcs11

    path = module_path(attrs)
    try:
        lib = pkcs11.lib(str(path))
    except Exception as exc:  # noqa: BLE001 - dlopen or C_Initialize: either way not a usable module
        raise InputError(f"PKCS#11 module {path}: cannot be loaded ({type(exc).__name__}).",
                         hint="Check it is the vendor's PKCS#11 library for this machine's architecture; "
                              "SoftHSM2 also needs SOFTHSM2_CONF to point at its configuration.") from None
    for name, actual in (("library-manufacturer", lib.manufacturer_id), ("library-description",
                                                                          lib.library_description)):
        if name in attrs and attrs[name] != actual:
            raise InputError(f"PKCS#11 module {path}: its {name} is '{actual}', not '{attrs[name]}'.")
    if "library-version" in attrs:
        want = tuple(int(p) for p in attrs["library-version"].split("."))
        if lib.library_version[:len(want)] != want:
            raise InputError(f"PKCS#11 module {path}: library version {lib.library_version}, the URI wants "
                             f"{attrs['library-version']}.")
    checks = {"token": lambda s, t: t.label, "manufacturer": lambda s, t: t.manufacturer_id,
              "model": lambda s, t: t.model, "serial": lambda s, t: _text(t.serial),
              "slot-id": lambda s, t: s.slot_id, "slot-description": lambda s, t: s.slot_description,
              "slot-manufacturer": lambda s, t: s.manufacturer_id}
    wanted = {name: attrs[name] for name in checks if name in attrs}
    try:
        tokens, found = [], []
        for slot in lib.get_slots(token_present=True):
            token = slot.get_token()
            if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:  # SoftHSM's spare empty slot, a blank card
                continue
            tokens.append(token.label)
            if all(check(slot, token) == attrs[name] for name, check in checks.items() if name in attrs):
                found.append(token)
    except pkcs11.PKCS11Error as exc:
        raise _token_error(exc, f"PKCS#11 module {path}") from None
    criteria = ", ".join(f"{k}={v}" for k, v in wanted.items()) or "anything"
    if not found:
        there = ", ".join(f"'{t}'" for t in tokens) or "none"
        raise InputError(f"PKCS#11 module {path}: no token matches {criteria} (tokens there: {there}).",
                         hint=_HINT_LIST)
    if len(found) > 1:
        raise InputError(f"PKCS#11 module {path}: {len(found)} tokens match {criteria}.",
                         hint="Add token=LABEL (or serial=) to the URI to name one.")
    return found[0]


def _one_object(session, attrs: dict, object_class, shown: str):
    import pkcs11

    search = {pkcs11.Attribute.CLASS: object_class}
    if "object" in attrs:
        search[pkcs11.Attribute.LABEL] = attrs["object"]
    if "id" in attrs:
        search[pkcs11.Attribute.ID] = attrs["id"]
    found = list(session.get_objects(search))
    if not found:
        raise InputError(f"{shown}: the token holds no private key with this label/id.",
                         hint="Check object= and id=; `pkcs11-tool --module MODULE -O --login` lists a token's "
                              "objects, and `msov keygen --pkcs11 URI` makes a key pair in it.")
    if len(found) > 1:
        raise InputError(f"{shown}: {len(found)} private keys match; the URI must name one.",
                         hint="Add object=LABEL and/or id=... to the URI.")
    return found[0]


def _flag(obj, attribute) -> bool:
    import pkcs11

    try:
        return bool(obj[attribute])
    except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive):
        return False


def _text(value) -> str:
    return (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).rstrip(" \x00")


def _curve_of(ec_params: bytes, shown: str) -> str:
    from asn1crypto.keys import ECDomainParameters

    try:
        params = ECDomainParameters.load(ec_params)
        name = params.chosen.native if params.name == "named" else None
    except ValueError:
        name = None
    if name not in _SUPPORTED_CURVES:
        raise InputError(f"{shown}: the key's curve ({name or 'explicit parameters'}) is not one OMS signing "
                         f"uses; it needs P-256 or P-384 (P-521 also verifies).",
                         hint="`msov keygen --pkcs11 URI --curve P-256` makes a suitable key.")
    return name


def _mechanism(token, curve: str):
    """(mechanism, hash to apply in Python first or None)."""
    import pkcs11

    hash_name = HASH_FOR_CURVE[curve]
    hashing = getattr(pkcs11.Mechanism, f"ECDSA_{hash_name}")
    available = token.slot.get_mechanisms()
    if hashing in available:
        return hashing, None
    if pkcs11.Mechanism.ECDSA in available:
        return pkcs11.Mechanism.ECDSA, hash_name.lower()
    raise InputError(f"PKCS#11 token '{token.label}': offers no ECDSA signing mechanism.",
                     hint="Use a token that supports CKM_ECDSA.")


def _public_key_of(public, curve: str, shown: str):
    """cryptography public key from a PKCS#11 public key object's CKA_EC_POINT."""
    import pkcs11
    from asn1crypto.core import OctetString
    from cryptography.hazmat.primitives.asymmetric import ec

    point = public[pkcs11.Attribute.EC_POINT]
    curve_obj = getattr(ec, curve.upper())()
    # the standard wraps the point in a DER OCTET STRING; some tokens give it bare (04 || X || Y, same first byte)
    if len(point) != 1 + 2 * ((curve_obj.key_size + 7) // 8):
        try:
            point = OctetString.load(point).native
        except ValueError:
            raise InputError(f"{shown}: the public key's EC point is not readable.") from None
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve_obj, point)
    except ValueError:
        raise InputError(f"{shown}: the public key's EC point is not a point of {curve}.") from None


def _matching_public_key(session, private, curve: str, sign, shown: str):
    """The token's public key object for `private` (same id, else same label), proven by a probe signature: a
    stale public object would make signatures nobody can verify."""
    import pkcs11
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    search = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY, pkcs11.Attribute.KEY_TYPE: pkcs11.KeyType.EC}
    key_id, label = private[pkcs11.Attribute.ID], private[pkcs11.Attribute.LABEL]
    candidates = list(session.get_objects({**search, pkcs11.Attribute.ID: key_id})) if key_id else []
    if not candidates and label:
        candidates = list(session.get_objects({**search, pkcs11.Attribute.LABEL: label}))
    probe = b"msov: does this public key belong to the token's private key?"
    signature = sign(probe) if candidates else b""
    for candidate in candidates:
        if _curve_of(candidate[pkcs11.Attribute.EC_PARAMS], shown) != curve:
            continue
        public_key = _public_key_of(candidate, curve, shown)
        try:
            public_key.verify(signature, probe, ec.ECDSA(getattr(hashes, HASH_FOR_CURVE[curve])()))
        except InvalidSignature:
            continue
        return public_key
    raise InputError(f"{shown}: the token holds no public key object matching the private key (same id or "
                     f"label, verifying its signature); verifiers would get no key.",
                     hint="Store the public key in the token with the private key's id, e.g. with "
                          "`pkcs11-tool --write-object KEY.pub --type pubkey --id ID`.")


def _pem(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def _token_error(exc, shown: str) -> InputError:
    """One sentence and a hint per PKCS#11 failure a user can act on; never the PIN."""
    import pkcs11

    kind = type(exc).__name__
    if isinstance(exc, (pkcs11.PinIncorrect, pkcs11.PinLenRange, pkcs11.PinInvalid)):
        return InputError(f"{shown}: the token refused the PIN (wrong PIN).",
                          hint=f"Check {PIN_ENV} or the pin-source file; too many wrong tries lock the token.")
    if isinstance(exc, pkcs11.PinLocked):
        return InputError(f"{shown}: the token's user PIN is locked after too many wrong tries.",
                          hint="Its security officer must unlock it (e.g. `softhsm2-util --init-pin`).")
    if isinstance(exc, (pkcs11.UserPinNotInitialized, pkcs11.PinExpired)):
        return InputError(f"{shown}: the token's user PIN is not set up ({kind}).",
                          hint="Initialise the token and its user PIN with the token's own tool.")
    if isinstance(exc, (pkcs11.TokenNotPresent, pkcs11.DeviceRemoved, pkcs11.TokenNotRecognised)):
        return InputError(f"{shown}: the token is not there (removed, or not recognised).", hint=_HINT_LIST)
    if isinstance(exc, (pkcs11.MechanismInvalid, pkcs11.KeyTypeInconsistent)):
        return InputError(f"{shown}: the token will not sign with this key ({kind}).",
                          hint="The key must allow signing (CKA_SIGN) with ECDSA.")
    return InputError(f"{shown}: the PKCS#11 token failed ({kind}).", hint=_HINT_LIST)
