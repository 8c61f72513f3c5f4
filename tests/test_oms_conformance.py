"""OMS v1.0 conformance of msov's key method, against the spec's schemas and test vectors, the key cases of the
OMS conformance suite (as data), genuine bundles of earlier model_signing releases, and the reference verifier.

Data: tests/oms/ (README.md there says where each file comes from). Real crypto, the real reference, no mocks.
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_sov.errors import InputError, VerificationError
from mistral_sov.trust.hashing import folder_digest
from mistral_sov.trust.keys import generate_keypair, key_hint, load_public_key
from mistral_sov.trust.oms import (PAYLOAD_TYPE, _check_statement, _read_bundle, bundle_claims, pae, sign_folder,
                                   verify_folder)

OMS = Path(__file__).resolve().parent / "oms"
SPEC = OMS / "spec-v1.0"
SHARED_SPEC = Path(__file__).resolve().parents[2] / "shared" / "oms" / "spec-v1.0"
HISTORY, UPSTREAM = OMS / "history", OMS / "upstream"
VERSIONS = ["v0.2.0", "v0.3.1", "v1.0.0", "v1.0.1", "v1.1.0"]
CASES = json.loads((OMS / "conformance" / "cases.json").read_text(encoding="utf-8"))
KEY_VECTOR = SPEC / "test-vectors" / "valid" / "key.bundle.json"
SPEC_KEY = UPSTREAM / "signing-key-pub.pem"  # the P-384 key the spec's key vector was made with


# -- helpers --------------------------------------------------------------------------------------------------------

def _registry():
    from referencing import Registry, Resource

    schemas = [json.loads(p.read_text()) for p in sorted((SPEC / "schemas").glob("*.schema.json"))]
    return Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas), \
        {s["$id"].split("/")[-3]: s for s in schemas}


def validate_bundle(path: Path) -> dict:
    """Validate a bundle against all four OMS v1.0 schemas, $refs resolved from the local copies (no network):
    bundle (which refers to the envelope), the decoded payload as a statement (which refers to the predicate),
    and envelope and predicate once more on their own. Returns the decoded statement."""
    from jsonschema import Draft202012Validator

    registry, schemas = _registry()

    def check(kind: str, doc) -> None:
        Draft202012Validator(schemas[kind], registry=registry).validate(doc)

    bundle = json.loads(Path(path).read_text(encoding="utf-8"))
    check("bundle", bundle)
    check("envelope", bundle["dsseEnvelope"])
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
    check("statement", statement)
    check("predicate", statement["predicate"])
    return statement


def statement_of(sig: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(Path(sig).read_text())["dsseEnvelope"]["payload"]))


def write_files(root: Path, files: dict) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes.fromhex(content["hex"]) if isinstance(content, dict) else content.encode("utf-8"))
    return root


def change_model(root: Path, changes: dict) -> None:
    for name, content in changes.get("tamper", {}).items():
        (root / name).write_text(content)
    for name in changes.get("delete", []):
        (root / name).unlink()
    for name, content in changes.get("inject", {}).items():
        write_files(root, {name: content})


def resign(bundle: dict, statement: dict, private_key: Path) -> dict:
    """The bundle with `statement` as its payload, signed again by `private_key` (hint updated)."""
    from cryptography.hazmat.primitives import serialization

    from mistral_sov.trust.signer import ecdsa_for

    key = serialization.load_pem_private_key(private_key.read_bytes(), None)
    payload = json.dumps(statement, indent=2).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload), ecdsa_for(key.public_key()))
    envelope = {**bundle["dsseEnvelope"], "payload": base64.b64encode(payload).decode(),
                "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": ""}]}
    return {**bundle, "verificationMaterial": {"publicKey": {"hint": key_hint(key.public_key())}, "tlogEntries": []},
            "dsseEnvelope": envelope}


def _set(doc, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    doc[int(last) if isinstance(doc, list) else last] = value


def _model_signing(*args) -> subprocess.CompletedProcess:
    """The reference CLI (as tests/test_signing.py runs it); the key method never touches the network."""
    return subprocess.run([sys.executable, "-m", "model_signing", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {curve: generate_keypair(root / curve, curve=curve) for curve in ("P-256", "P-384", "P-521")}


# -- the spec's schemas and test vectors ----------------------------------------------------------------------------

def test_schema_copies_match_the_shared_spec():
    if not SHARED_SPEC.is_dir():
        pytest.skip(f"{SHARED_SPEC} not present")
    for path in sorted(p for p in SPEC.rglob("*") if p.is_file()):
        assert path.read_bytes() == (SHARED_SPEC / path.relative_to(SPEC)).read_bytes(), path


@pytest.mark.parametrize("vector", sorted((SPEC / "test-vectors").rglob("*.json")), ids=lambda p: p.stem)
def test_the_validator_agrees_with_the_spec_vectors(vector):
    """validate_bundle itself is sound: it accepts the valid vectors and refuses every invalid one."""
    import jsonschema

    if vector.parent.name == "valid":
        assert validate_bundle(vector)["predicateType"] == "https://model_signing/signature/v1.0"
    else:
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            validate_bundle(vector)


def test_the_spec_key_vector_parses_and_verifies(tmp_path):
    bundle = _read_bundle(KEY_VECTOR)
    payload = base64.b64decode(bundle["dsseEnvelope"]["payload"])
    statement = _check_statement(payload, KEY_VECTOR, allowed_ignore=[".git", ".gitattributes", ".github",
                                                                       ".gitignore", "ignore-me"])
    assert [r["name"] for r in statement["predicate"]["resources"]] == ["signme-1", "signme-2"]
    for other in ("certificate", "sigstore"):  # the other methods' vectors are well-formed bundles too
        _read_bundle(SPEC / "test-vectors" / "valid" / f"{other}.bundle.json")

    model = write_files(tmp_path / "model", CASES["simple_model"])
    report = verify_folder(model, SPEC_KEY, sig_path=KEY_VECTOR, ignore=("ignore-me",))
    assert report["subject_digest"] == "92745110b1ab4368471cbe31664e10174e954b113a3df333db860317b2c6dec4"
    assert report["key"]["curve"] == "secp384r1" and report["key"]["hint"].startswith("e8450dec")


INVALID = {
    "empty": "is empty, not a signature bundle",
    "missing-envelope": "the bundle holds no DSSE envelope",
    "missing-verification-material": "the bundle holds no verificationMaterial",
    "missing-tlog-entries": "without the transparency log entries that method requires",
    "wrong-predicate": "the signature does not verify",  # its payload was edited after signing
}


@pytest.mark.parametrize("name", INVALID)
def test_each_invalid_spec_vector_is_refused_with_a_sensible_message(tmp_path, name):
    vector = next((SPEC / "test-vectors").rglob(f"{name}.bundle.json"))
    model = write_files(tmp_path / "model", CASES["simple_model"])
    with pytest.raises(VerificationError) as refused:
        verify_folder(model, SPEC_KEY, sig_path=vector, ignore=("ignore-me",))
    assert INVALID[name] in refused.value.message and str(vector) in refused.value.message
    if name == "wrong-predicate":  # and the statement check names it once the signature is not the issue
        payload = base64.b64decode(json.loads(vector.read_text())["dsseEnvelope"]["payload"])
        with pytest.raises(VerificationError, match="has predicateType 'https://example.com/wrong-predicate/v1.0'"):
            _check_statement(payload, vector, allowed_ignore=["ignore-me"])


# -- the conformance suite's key cases (tests/oms/conformance/cases.json) ------------------------------------------

@pytest.mark.parametrize("case", CASES["verify"], ids=[c["name"] for c in CASES["verify"]])
def test_conformance_verify_case(case, tmp_path, keys):
    model = write_files(tmp_path / "model", CASES["simple_model"])
    change_model(model, case.get("model_changes", {}))
    bundle = json.loads(KEY_VECTOR.read_text())
    changes = case.get("bundle_changes", {})
    for dotted, value in changes.get("set", {}).items():
        _set(bundle, dotted, value)
    for key in changes.get("delete", []):
        del bundle[key]
    statement = statement_of(KEY_VECTOR)
    edits = case.get("statement_changes", {})
    for dotted, value in edits.get("set", {}).items():
        _set(statement, dotted, value)
    for key in edits.get("delete", []):
        del statement[key]
    if edits:
        bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    text = changes.get("text", json.dumps(bundle))
    sig = tmp_path / "bundle.sig"
    sig.write_text(text[: changes["truncate"]] if "truncate" in changes else text)

    params = case.get("verify", {})
    key, ca = {"other": (keys["P-384"][1], ()), "none-ca": (None, (tmp_path / "unused-root.crt",))}.get(
        params.get("key"), (SPEC_KEY, ()))

    def run(sig_path: Path, public_key):
        return verify_folder(model, public_key, sig_path=sig_path, ca=ca, ignore=tuple(params.get("ignore", ())),
                             ignore_unsigned=params.get("ignore_unsigned", False))

    if case["expect"] == "pass":
        assert run(sig, key)["status"] == "verified"
        return
    with pytest.raises(VerificationError) as refused:
        run(sig, key)
    assert case["error"] in refused.value.message, refused.value.message
    if "error_resigned" in case:
        private, public = keys["P-256"]
        (tmp_path / "resigned.sig").write_text(json.dumps(resign(bundle, statement, private)))
        with pytest.raises(VerificationError) as refused:
            run(tmp_path / "resigned.sig", public)
        assert case["error_resigned"] in refused.value.message, refused.value.message


@pytest.mark.parametrize("case", CASES["roundtrip"], ids=[c["name"] for c in CASES["roundtrip"]])
def test_conformance_roundtrip_case(case, tmp_path, keys):
    model = write_files(tmp_path / "model", case["files"])
    for name, target in case.get("symlinks", {}).items():
        (model / name).symlink_to(target)
    params = case.get("sign", {})
    private, public = keys[params.get("curve", "P-256")]
    sig = model / params["sig_inside"] if "sig_inside" in params else tmp_path / "model.sig"
    ignore = tuple(params.get("ignore", ()))
    if case.get("expect") == "sign-fails":
        with pytest.raises(InputError, match=case["error"]):
            sign_folder(model, private, sig_path=sig, ignore=ignore)
        assert not sig.exists()
        return

    signed = sign_folder(model, private, sig_path=sig, ignore=ignore)
    statement = validate_bundle(sig)
    names = [r["name"] for r in statement["predicate"]["resources"]]
    assert names == sorted(names) == case["signed"]  # §5.2.1, §6.4
    concatenated = b"".join(bytes.fromhex(r["digest"]) for r in statement["predicate"]["resources"])
    assert statement["subject"][0]["digest"]["sha256"] == signed["subject_digest"] == \
        hashlib.sha256(concatenated).hexdigest()  # §6.5.1
    recorded = statement["predicate"]["serialization"]["ignore_paths"]
    assert {".git", ".gitattributes", ".github", ".gitignore", *ignore} <= set(recorded)
    if "sig_inside" in params:  # §6.2, §9: the bundle is left out of what it signs, and says so
        assert params["sig_inside"] in recorded and params["sig_inside"] not in names
    if params.get("twice"):
        first = json.loads(sig.read_text())
        sign_folder(model, private, sig_path=sig, ignore=ignore)
        again = json.loads(sig.read_text())
        assert again["dsseEnvelope"]["payload"] == first["dsseEnvelope"]["payload"]
    change_model(model, case.get("model_changes", {}))
    verify = case.get("verify", {})
    report = verify_folder(model, public, sig_path=sig, ignore=tuple(verify.get("ignore", ())),
                           ignore_unsigned=verify.get("ignore_unsigned", False))
    assert [f["name"] for f in report["files"]] == case["signed"]


# -- user ignore paths (§6.2.1) and unsigned files (§8.5) ----------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    return write_files(tmp_path / "model", {
        "weights.bin": "w\n", "config.json": "{}\n", "cache/a.tmp": "a\n", "cache/deep/b.tmp": "b\n",
        "logs/run.txt": "log\n", "logs/keep.txt": "keep\n", "sub/cache/x.bin": "x\n"})


def test_user_ignore_paths_are_recorded_and_must_be_passed_again_to_verify(folder, tmp_path, keys):
    private, public = keys["P-256"]
    sig = tmp_path / "model.sig"
    result = sign_folder(folder, private, sig_path=sig, ignore=("cache/", str(folder / "logs" / "run.txt")))
    statement = validate_bundle(sig)
    serialization = statement["predicate"]["serialization"]
    assert serialization["ignore_paths"] == result["ignore_paths"] == \
        [".git", ".gitattributes", ".github", ".gitignore", "cache", "logs/run.txt"]
    names = [r["name"] for r in statement["predicate"]["resources"]]
    assert names == ["config.json", "logs/keep.txt", "sub/cache/x.bin", "weights.bin"]  # exact paths: not sub/cache

    with pytest.raises(VerificationError) as refused:  # the bundle alone never widens what is skipped
        verify_folder(folder, public, sig_path=sig)
    assert "ignores paths beyond the defaults (cache, logs/run.txt)" in refused.value.message
    assert "--ignore" in refused.value.hint
    with pytest.raises(VerificationError, match=r"beyond the defaults \(logs/run.txt\)"):
        verify_folder(folder, public, sig_path=sig, ignore=("cache",))
    (folder / "cache" / "a.tmp").write_text("changed: not signed, not checked\n")
    (folder / "cache" / "new.tmp").write_text("new\n")
    report = verify_folder(folder, public, sig_path=sig, ignore=("cache", "logs/run.txt", "not/recorded"))
    assert report["ignore_paths"] == serialization["ignore_paths"] and report["unsigned"] == []
    _flip(folder / "logs" / "keep.txt")
    with pytest.raises(VerificationError, match="changed: logs/keep.txt"):
        verify_folder(folder, public, sig_path=sig, ignore=("cache", "logs/run.txt"))


def test_an_ignore_path_never_hides_a_change_to_a_signed_file(folder, tmp_path, keys):
    """A verifier's ignore path excuses unsigned files there; a signed file there is still checked (§8.4)."""
    private, public = keys["P-256"]
    sig = tmp_path / "model.sig"
    sign_folder(folder, private, sig_path=sig)
    (folder / "cache" / "later.tmp").write_text("later\n")
    report = verify_folder(folder, public, sig_path=sig, ignore=("cache",))
    assert "cache/a.tmp" in [f["name"] for f in report["files"]]
    _flip(folder / "cache" / "deep" / "b.tmp")
    with pytest.raises(VerificationError, match="changed: cache/deep/b.tmp"):
        verify_folder(folder, public, sig_path=sig, ignore=("cache",))
    (folder / "cache" / "deep" / "b.tmp").unlink()
    (folder / "cache" / "deep" / "b.tmp").symlink_to(folder / "weights.bin")
    with pytest.raises(VerificationError, match="'cache/deep/b.tmp' is a symbolic link"):
        verify_folder(folder, public, sig_path=sig, ignore=("cache",))


@pytest.mark.parametrize("bad", ["*.tmp", "cache/[ab].tmp", "../outside", "a/../b", "/", "a//b", "", "a\\b",
                                 "line\nbreak", "."])
def test_ignore_paths_that_are_not_plain_relative_paths_are_refused(folder, tmp_path, keys, bad):
    private, public = keys["P-256"]
    with pytest.raises(InputError, match="ignore path"):
        sign_folder(folder, private, sig_path=tmp_path / "model.sig", ignore=(bad,))
    assert not (tmp_path / "model.sig").exists()
    sign_folder(folder, private, sig_path=tmp_path / "model.sig")
    with pytest.raises(InputError, match="ignore path"):
        verify_folder(folder, public, sig_path=tmp_path / "model.sig", ignore=(bad,))


def test_an_absolute_ignore_path_outside_the_folder_is_refused(folder, tmp_path, keys):
    with pytest.raises(InputError, match="lies outside the folder"):
        sign_folder(folder, keys["P-256"][0], sig_path=tmp_path / "model.sig", ignore=(str(tmp_path),))


def test_provenance_cannot_be_ignored(folder, tmp_path, keys):
    write_files(folder, {"msov/provenance.json": "{}\n"})
    with pytest.raises(InputError, match="msov/provenance.json"):
        sign_folder(folder, keys["P-256"][0], sig_path=tmp_path / "model.sig", ignore=("msov",))


def test_ignore_unsigned_files_lets_extra_files_pass_but_never_a_changed_or_missing_signed_one(folder, tmp_path,
                                                                                                keys):
    private, public = keys["P-256"]
    sig = tmp_path / "model.sig"
    sign_folder(folder, private, sig_path=sig)
    write_files(folder, {"extra.bin": "e\n", "cache/deep/extra.tmp": "e\n", "new/dir/f": "f\n"})
    with pytest.raises(VerificationError, match=r"added \(not signed\): cache/deep/extra.tmp, extra.bin, new/dir/f"):
        verify_folder(folder, public, sig_path=sig)
    report = verify_folder(folder, public, sig_path=sig, ignore_unsigned=True)
    assert report["unsigned"] == ["cache/deep/extra.tmp", "extra.bin", "new/dir/f"]
    _flip(folder / "weights.bin")
    with pytest.raises(VerificationError, match="changed: weights.bin"):
        verify_folder(folder, public, sig_path=sig, ignore_unsigned=True)
    _flip(folder / "weights.bin")
    (folder / "config.json").unlink()
    with pytest.raises(VerificationError, match="removed: config.json"):
        verify_folder(folder, public, sig_path=sig, ignore_unsigned=True)


# -- curves, and the reference implementation both ways ------------------------------------------------------------

@pytest.mark.parametrize("curve", ["P-256", "P-384", "P-521"])
def test_each_curve_signs_verifies_and_cross_verifies_with_model_signing(folder, tmp_path, keys, curve):
    pytest.importorskip("model_signing")
    private, public = keys[curve]
    sig = tmp_path / "msov.sig"
    sign_folder(folder, private, sig_path=sig, ignore=("cache",))
    validate_bundle(sig)
    report = verify_folder(folder, public, sig_path=sig, ignore=("cache",))
    assert report["key"]["curve"] == {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}[curve]
    done = _model_signing("verify", "key", folder, "--signature", sig, "--public_key", public)
    assert done.returncode == 0 and "Verification succeeded" in done.stdout, done.stdout + done.stderr

    theirs = tmp_path / "theirs.sig"
    done = _model_signing("sign", "key", folder, "--private_key", private, "--signature", theirs,
                          "--ignore-paths", folder / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert verify_folder(folder, public, sig_path=theirs, ignore=("cache",))["subject_digest"] == \
        report["subject_digest"]
    _flip(folder / "config.json")
    with pytest.raises(VerificationError, match="changed: config.json"):
        verify_folder(folder, public, sig_path=theirs, ignore=("cache",))


def test_p521_keygen_and_a_curve_oms_does_not_use_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _, public = generate_keypair(tmp_path / "k", curve="P-521")
    assert load_public_key(public).curve.name == "secp521r1"
    other = ec.generate_private_key(ec.SECP256K1())
    (tmp_path / "k1.pem").write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    os.chmod(tmp_path / "k1.pem", 0o600)
    write_files(tmp_path / "m", {"f": "f\n"})
    with pytest.raises(InputError, match="needs an ECDSA P-256, P-384 or P-521 key"):
        sign_folder(tmp_path / "m", tmp_path / "k1.pem", sig_path=tmp_path / "m.sig")


def test_signing_is_deterministic_where_the_spec_asks(folder, tmp_path, keys):
    """The statement (names, order, digests, ignore paths) is the same bytes every time and with any key; the
    ECDSA signature is not (a fresh nonce each time, which OMS does not constrain) and each one verifies."""
    copy = tmp_path / "copy" / "model"
    write_files(copy, {name: (folder / name).read_text() for name in reversed(
        [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()])})
    bundles = []
    for target, key in [(folder, "P-256"), (folder, "P-256"), (copy, "P-384")]:
        sig = tmp_path / f"{len(bundles)}.sig"
        sign_folder(target, keys[key][0], sig_path=sig, ignore=("cache",))
        bundles.append(json.loads(sig.read_text()))
        verify_folder(target, keys[key][1], sig_path=sig, ignore=("cache",))
    payloads = {b["dsseEnvelope"]["payload"] for b in bundles}
    assert len(payloads) == 1
    assert bundles[0]["dsseEnvelope"]["signatures"] != bundles[1]["dsseEnvelope"]["signatures"]


# -- bundles written by earlier model_signing releases (§11) -------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_each_historical_bundle_verifies_and_fails_after_one_changed_byte(version, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(HISTORY / "model", model)
    sig, public = HISTORY / version / "model.sig", HISTORY / "test-p256.pub"
    report = verify_folder(model, public, sig_path=sig, ignore=("ignore-me",))
    assert report["subject_digest"] == folder_digest(model, ignore=[".git", "ignore-me"])
    assert report["subject"] == "model"
    assert len(report["files"]) == 4 and "nested/deeper/模型-ü.txt" in [f["name"] for f in report["files"]]
    assert bundle_claims(sig)["key_hint"] == key_hint(load_public_key(public))
    assert bundle_claims(sig)["subject_digest"] == report["subject_digest"]
    with pytest.raises(VerificationError, match="ignore-me"):  # unsigned (or ignored by the bundle alone)
        verify_folder(model, public, sig_path=sig)
    for name in [f["name"] for f in report["files"]]:
        _flip(model / name, at=3)
        with pytest.raises(VerificationError, match=f"changed: {name}"):
            verify_folder(model, public, sig_path=sig, ignore=("ignore-me",))
        _flip(model / name, at=3)
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(VerificationError, match="does not verify|another key"):
        verify_folder(model, other, sig_path=sig, ignore=("ignore-me",))


@pytest.mark.parametrize("name", ["v1.0.1-elliptic-key", "v1.1.0-elliptic-key"])
def test_bundles_published_by_model_transparency_verify(name, tmp_path):
    model = tmp_path / name
    shutil.copytree(UPSTREAM / name, model)
    report = verify_folder(model, SPEC_KEY, sig_path=model / "model.sig", ignore=("ignore-me",))
    assert [f["name"] for f in report["files"]] == ["signme-1", "signme-2"]
    assert report["key"]["curve"] == "secp384r1"
    _flip(model / "signme-2")
    with pytest.raises(VerificationError, match="changed: signme-2"):
        verify_folder(model, SPEC_KEY, sig_path=model / "model.sig", ignore=("ignore-me",))


def test_the_v020_signing_encoding_is_accepted_for_its_own_format_only(tmp_path, keys):
    """model_signing 0.2.0 signed a mangled PAE; msov accepts it for a Digests/v0.1 statement (what 0.2.0 wrote)
    and never for a v1.0 statement, so that encoding cannot carry a current manifest."""
    from cryptography.hazmat.primitives import serialization

    from mistral_sov.trust.signer import ecdsa_for

    model = write_files(tmp_path / "model", {"f": "f\n"})
    private, public = keys["P-256"]
    sig = tmp_path / "model.sig"
    sign_folder(model, private, sig_path=sig)
    bundle = json.loads(sig.read_text())
    payload = base64.b64decode(bundle["dsseEnvelope"]["payload"])
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    mangled = b"DSSEV1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), repr(payload).encode())
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(
        key.sign(mangled, ecdsa_for(key.public_key()))).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(VerificationError, match="the signature does not verify"):
        verify_folder(model, public, sig_path=sig)


def test_older_field_forms_are_accepted(tmp_path, keys):
    """§11.1: keyid absent or null, tlogEntries absent, publicKey as rawBytes, the other v0.3 media type spelling,
    extra fields in a resource descriptor, any non-empty subject name."""
    model = write_files(tmp_path / "model", {"f": "f\n", "g": "g\n"})
    private, public = keys["P-384"]
    sig = tmp_path / "model.sig"
    sign_folder(model, private, sig_path=sig)
    bundle = json.loads(sig.read_text())
    statement = statement_of(sig)
    statement["subject"][0]["name"] = "model"
    statement["predicate"]["resources"][0]["annotations"] = {"note": "ignored"}
    del statement["predicate"]["serialization"]["ignore_paths"]
    bundle = resign(bundle, statement, private)
    bundle["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.3"
    bundle["verificationMaterial"] = {"publicKey": {"rawBytes": base64.b64encode(public.read_bytes()).decode(),
                                                    "keyDetails": "PKIX_ECDSA_P384_SHA_384"}}
    for keyid in (None, "absent", ""):
        signature = dict(bundle["dsseEnvelope"]["signatures"][0])
        if keyid == "absent":
            signature.pop("keyid")
        else:
            signature["keyid"] = keyid
        sig.write_text(json.dumps({**bundle, "dsseEnvelope": {**bundle["dsseEnvelope"], "signatures": [signature]}}))
        assert verify_folder(model, public, sig_path=sig)["subject"] == "model"
    assert bundle_claims(sig)["key_hint"] == key_hint(load_public_key(public))


@pytest.mark.parametrize("serialization, message", [
    ({"method": "shards", "hash_type": "sha256", "shard_size": 1000, "allow_symlinks": False}, "in shards"),
    ({"method": "files", "hash_type": "blake3", "allow_symlinks": False}, "sha256 digests only"),
    ({"method": "files", "hash_type": "sha256", "allow_symlinks": True}, "allow_symlinks: true"),
])
def test_what_msov_does_not_verify_is_refused_by_name(tmp_path, keys, serialization, message):
    model = write_files(tmp_path / "model", {"f": "f\n"})
    private, public = keys["P-256"]
    sig = tmp_path / "model.sig"
    sign_folder(model, private, sig_path=sig)
    statement = statement_of(sig)
    statement["predicate"]["serialization"] = serialization
    sig.write_text(json.dumps(resign(json.loads(sig.read_text()), statement, private)))
    with pytest.raises(VerificationError, match=message):
        verify_folder(model, public, sig_path=sig)
