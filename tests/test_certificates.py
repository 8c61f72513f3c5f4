"""The OMS certificate method (§4.1) with an organisation's own CA, made here with `cryptography`: a root, an
intermediate and a code-signing leaf. Real signatures, the real reference tool (`model_signing`, offline) both
ways, the bundle schema, and every way a chain can be wrong failing with its own sentence."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from mistral_sov.errors import InputError, VerificationError
from mistral_sov.trust.certs import CertificateSigner, chain_from_bundle, leaf_claims, verify_chain
from mistral_sov.trust.keys import generate_keypair, key_hint, load_private_key
from mistral_sov.trust.oms import _check_envelope, bundle_claims, sign_folder, verify_folder
from mistral_sov.trust.signer import KeyFileSigner

SPEC = REPO.parent / "shared" / "oms" / "spec-v1.0"
NOW = dt.datetime.now(dt.timezone.utc)


# -- a CA made for the test ----------------------------------------------------------------------------------------

def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, public_key, issuer: tuple | None, *, ca: bool, path_length: int | None = None,
           usage: str | None = "sign", eku: str | None = "codeSigning", days: tuple[int, int] = (-1, 30)):
    """A certificate for `public_key`, signed by `issuer` = (certificate, private key), or self-signed when None
    (then `public_key` is a private key). usage: "sign" (digitalSignature), "encipher" (keyEncipherment only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    signing_key = issuer[1] if issuer else public_key
    public = public_key.public_key() if issuer is None else public_key
    issuer_name = issuer[0].subject if issuer else _name(subject)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name).public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW + dt.timedelta(days=days[0])).not_valid_after(NOW + dt.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
                              critical=False))
    flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    if ca:
        flags.update(key_cert_sign=True, crl_sign=True)
    elif usage == "sign":
        flags.update(digital_signature=True)
    elif usage == "encipher":
        flags.update(key_encipherment=True)
    if ca or usage:
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
    if eku and not ca:
        oid = {"codeSigning": ExtendedKeyUsageOID.CODE_SIGNING, "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH}[eku]
        builder = builder.add_extension(x509.ExtendedKeyUsage([oid]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(path: Path, *certs) -> Path:
    from cryptography.hazmat.primitives.serialization import Encoding

    path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in certs))
    return path


class Pki:
    """root → intermediate → leaf (codeSigning, digitalSignature) for the key pair KEYS/leaf.pem, .pub."""

    def __init__(self, root_dir: Path):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.dir = root_dir
        self.root_key, self.int_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256R1())
        self.root = _issue("Example Root CA", self.root_key, None, ca=True, days=(-90, 3650))
        self.inter = _issue("Example Signing CA", self.int_key.public_key(), (self.root, self.root_key), ca=True,
                            path_length=0, days=(-60, 1825))
        self.key, self.pub = generate_keypair(root_dir / "leaf")
        self.leaf_public = load_private_key(self.key).public_key()
        self.leaf = self.issue_leaf("ML Release Signer")
        self.root_crt = _write(root_dir / "root.crt", self.root)
        self.int_crt = _write(root_dir / "int.crt", self.inter)
        self.leaf_crt = _write(root_dir / "leaf.crt", self.leaf)

    def issue_leaf(self, subject: str, **kw):
        return _issue(subject, self.leaf_public, (self.inter, self.int_key), ca=False, **kw)

    def write_leaf(self, name: str, subject: str, **kw) -> Path:
        return _write(self.dir / name, self.issue_leaf(subject, **kw))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def model(tmp_path) -> Path:
    """A small model folder: what is signed does not matter to the certificate method."""
    folder = tmp_path / "adapter"
    (folder / "msov").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}\n')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "README.md").write_text("a model card\n")
    return folder


def _sig(model: Path) -> Path:
    return model.parent / "adapter.sig"


def _sign(cli, pki: Pki, model: Path, *extra) -> None:
    result = cli("sign", model, "--key", pki.key, "--cert", pki.leaf_crt, "--chain", pki.int_crt, *extra)
    assert result.exit_code == 0, result.stderr


def _model_signing(*args) -> subprocess.CompletedProcess:
    """The reference CLI in a process without network when `unshare -n` is allowed (the certificate method never
    reaches out: its roots are the files given)."""
    prefix = (["unshare", "-n"] if shutil.which("unshare")
              and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 else [])
    return subprocess.run([*prefix, sys.executable, "-m", "model_signing", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- the round trip ------------------------------------------------------------------------------------------------

def test_sign_and_verify_with_a_ca(cli, pki, model):
    signed = cli("sign", model, "--key", pki.key, "--cert", pki.leaf_crt, "--chain", pki.int_crt)
    assert signed.exit_code == 0, signed.stderr
    assert "ML Release Signer" in signed.stdout and "Example Signing CA" in signed.stdout

    bundle = json.loads(_sig(model).read_text())
    material = bundle["verificationMaterial"]
    assert set(material) == {"x509CertificateChain", "tlogEntries"} and material["tlogEntries"] == []
    from cryptography.hazmat.primitives.serialization import Encoding
    assert chain_from_bundle(material) == [pki.leaf.public_bytes(Encoding.DER), pki.inter.public_bytes(Encoding.DER)]

    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 0, result.stderr
    text = _one_line(result.stdout)
    assert "verified 3 files" in text
    assert "signed by CN=ML Release Signer,O=Example Org" in text
    assert "CN=Example Signing CA,O=Example Org → CN=Example Root CA,O=Example Org" in text

    explained = _one_line(cli("verify", model, "--ca", pki.root_crt, "--explain").stdout)
    assert f"method certificate: chain validated to the --ca root {pki.root_crt}" in explained
    assert f"signer key SHA256:{key_hint(pki.leaf_public)}" in explained
    assert "issuer chain CN=Example Signing CA" in explained and "valid " in explained

    report = json.loads(cli("verify", model, "--ca", pki.root_crt, "--json").stdout)
    signer = report["key"]
    assert signer["method"] == "certificate" and signer["subject"] == "CN=ML Release Signer,O=Example Org"
    assert signer["issuers"] == ["CN=Example Signing CA,O=Example Org", "CN=Example Root CA,O=Example Org"]
    assert signer["hint"] == key_hint(pki.leaf_public) and signer["path"] == str(pki.root_crt)
    assert signer["not_after"] == pki.leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z")

    claims = bundle_claims(_sig(model))
    assert claims["method"] == "certificate" and claims["signer"] == signer["subject"]
    assert claims["key_hint"] == signer["hint"] and claims["subject_digest"] == report["subject_digest"]


def test_bundle_matches_the_oms_bundle_schema(cli, pki, model):
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    if not (SPEC / "schemas" / "bundle.schema.json").is_file():
        pytest.skip(f"OMS spec not found at {SPEC}")
    _sign(cli, pki, model)
    # bundle.schema.json reaches the envelope (and it the statement and predicate) by $id, not by file name
    schemas = [json.loads(p.read_text()) for p in (SPEC / "schemas").glob("*.schema.json")]
    registry = referencing.Registry().with_resources(
        (s["$id"], referencing.Resource.from_contents(s)) for s in schemas)
    bundle_schema = next(s for s in schemas if s["$id"].endswith("/bundle/v1.0/schema"))
    validator = jsonschema.Draft202012Validator(bundle_schema, registry=registry)
    bundle = json.loads(_sig(model).read_text())
    assert not list(validator.iter_errors(bundle))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement_schema = next(s for s in schemas if s["$id"].endswith("/statement/v1.0/schema"))
    assert not list(jsonschema.Draft202012Validator(statement_schema, registry=registry).iter_errors(statement))
    # and the schema does tell a certificate chain from nothing at all
    bundle["verificationMaterial"] = {"x509CertificateChain": {"certificates": []}}
    assert list(validator.iter_errors(bundle))


def test_leaf_only_fullchain_file_and_chain_order(pki, tmp_path):
    """--cert may be a fullchain file; --chain files in any order end up leaf-first, each signed by the next."""
    fullchain = _write(tmp_path / "fullchain.pem", pki.leaf, pki.inter)
    signer = CertificateSigner(KeyFileSigner(pki.key), fullchain)
    assert [c.subject for c in signer.chain] == [pki.leaf.subject, pki.inter.subject]
    with_root = CertificateSigner(KeyFileSigner(pki.key), pki.leaf_crt, (pki.root_crt, pki.int_crt))
    assert [c.subject for c in with_root.chain] == [pki.leaf.subject, pki.inter.subject, pki.root.subject]
    assert signer.describe()["issuers"] == ["CN=Example Signing CA,O=Example Org", "CN=Example Root CA,O=Example Org"]


# -- the reference implementation, both ways -----------------------------------------------------------------------

def test_model_signing_accepts_msov_certificate_bundles(cli, pki, model):
    pytest.importorskip("model_signing")
    _sign(cli, pki, model)
    done = _model_signing("verify", "certificate", model, "--signature", _sig(model),
                          "--certificate_chain", pki.root_crt)
    assert done.returncode == 0 and "Verification succeeded" in done.stdout, done.stdout + done.stderr
    (model / "README.md").write_text("changed\n")  # and it really checks the files
    done = _model_signing("verify", "certificate", model, "--signature", _sig(model),
                          "--certificate_chain", pki.root_crt)
    assert done.returncode != 0


def test_msov_verifies_model_signing_certificate_bundles(pki, model, tmp_path):
    pytest.importorskip("model_signing")
    sig = tmp_path / "reference.sig"
    done = _model_signing("sign", "certificate", model, "--signature", sig, "--private_key", pki.key,
                          "--signing_certificate", pki.leaf_crt, "--certificate_chain", pki.int_crt)
    assert done.returncode == 0, done.stdout + done.stderr
    report = verify_folder(model, sig_path=sig, ca=(pki.root_crt,))
    assert report["key"]["subject"] == "CN=ML Release Signer,O=Example Org"
    assert report["key"]["issuers"][-1] == "CN=Example Root CA,O=Example Org"
    assert [f["name"] for f in report["files"]] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_expired_leaf_fails_here_though_the_reference_accepts_it(cli, pki, model, tmp_path):
    """OMS §8.2: "The leaf certificate MUST be within its validity period." With no trusted time in the bundle,
    msov checks it now; model_signing 1.1.1 checks the chain at the leaf's own notBefore, so it never sees expiry."""
    pytest.importorskip("model_signing")
    expired = pki.write_leaf("expired.crt", "Former Signer", days=(-30, -2))
    refused = cli("sign", model, "--key", pki.key, "--cert", expired, "--chain", pki.int_crt)
    assert refused.exit_code == 3 and "expired on" in refused.stderr, refused.stderr

    sig = tmp_path / "expired.sig"
    done = _model_signing("sign", "certificate", model, "--signature", sig, "--private_key", pki.key,
                          "--signing_certificate", expired, "--certificate_chain", pki.int_crt)
    assert done.returncode == 0, done.stderr
    reference = _model_signing("verify", "certificate", model, "--signature", sig, "--certificate_chain",
                               pki.root_crt)
    assert reference.returncode == 0, "model_signing changed its rule: update the module docstring of certs.py"
    result = cli("verify", model, "--ca", pki.root_crt, "--sig", sig)
    assert result.exit_code == 4
    when = (NOW - dt.timedelta(days=2)).strftime("%Y-%m-%d")
    assert f"the leaf certificate 'CN=Former Signer,O=Example Org' expired on {when}" in _one_line(result.stderr)


# -- refused when signing ------------------------------------------------------------------------------------------

def test_certificate_for_another_key_is_refused_at_signing(cli, pki, model, tmp_path):
    other_key, _ = generate_keypair(tmp_path / "other")
    result = cli("sign", model, "--key", other_key, "--cert", pki.leaf_crt, "--chain", pki.int_crt)
    assert result.exit_code == 3 and "certifies another key" in result.stderr, result.stderr
    assert not _sig(model).exists()


@pytest.mark.parametrize("kind, message", [
    (dict(usage="encipher", eku=None), "keyUsage lacks digitalSignature"),
    (dict(usage=None, eku="serverAuth"), "extendedKeyUsage (serverAuth) lacks codeSigning"),
    (dict(usage=None, eku=None), "neither keyUsage digitalSignature nor extended key usage codeSigning"),
])
def test_leaf_not_for_signing_is_refused_both_when_signing_and_verifying(cli, pki, model, tmp_path, kind, message):
    crt = pki.write_leaf(f"nosign-{kind['usage']}-{kind['eku']}.crt", "TLS Server", **kind)
    refused = cli("sign", model, "--key", pki.key, "--cert", crt, "--chain", pki.int_crt)
    assert refused.exit_code == 3 and message in _one_line(refused.stderr), refused.stderr
    # a bundle made anyway (the reference signer does not look) does not verify either
    pytest.importorskip("model_signing")
    sig = tmp_path / "nosign.sig"
    assert _model_signing("sign", "certificate", model, "--signature", sig, "--private_key", pki.key,
                          "--signing_certificate", crt, "--certificate_chain", pki.int_crt).returncode == 0
    result = cli("verify", model, "--ca", pki.root_crt, "--sig", sig)
    assert result.exit_code == 4, result.stderr
    assert f"the leaf certificate 'CN=TLS Server,O=Example Org' is not for signing: its {message}" \
        in _one_line(result.stderr).replace("it has neither", "its neither")


def test_chain_that_does_not_link_is_refused_at_signing(cli, pki, model, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _write(tmp_path / "stranger.crt", _issue("Another CA", stranger_key, None, ca=True))
    result = cli("sign", model, "--key", pki.key, "--cert", pki.leaf_crt, "--chain", stranger)
    assert result.exit_code == 3 and "'CN=Another CA,O=Example Org' is no link of the chain" in \
        _one_line(result.stderr), result.stderr
    # same name as the real intermediate, another key: the name links, the signature does not
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _write(tmp_path / "impostor.crt", _issue("Example Signing CA", impostor_key, None, ca=True))
    result = cli("sign", model, "--key", pki.key, "--cert", pki.leaf_crt, "--chain", impostor)
    assert result.exit_code == 3 and "did not sign it" in result.stderr, result.stderr
    result = cli("sign", model, "--key", pki.key, "--chain", pki.int_crt)
    assert result.exit_code == 2 and "pass --cert too" in result.stderr


# -- refused when verifying ----------------------------------------------------------------------------------------

def test_wrong_root(cli, pki, model, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    _sign(cli, pki, model)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _write(tmp_path / "other-root.crt", _issue("Other Root CA", other_key, None, ca=True))
    result = cli("verify", model, "--ca", other)
    assert result.exit_code == 4
    assert ("the certificate chain does not lead to any --ca root: it ends at 'CN=Example Signing CA,O=Example "
            "Org', issued by 'CN=Example Root CA,O=Example Org', which is not among the --ca roots ('CN=Other "
            "Root CA,O=Example Org')") in _one_line(result.stderr)
    # a root with the right name and another key is no better
    twin = _write(tmp_path / "twin-root.crt", _issue("Example Root CA", other_key, None, ca=True))
    result = cli("verify", model, "--ca", twin)
    assert result.exit_code == 4 and "the --ca certificate of that name did not sign it" in _one_line(result.stderr)
    # several roots: the right one among them is enough
    assert cli("verify", model, "--ca", other, "--ca", pki.root_crt).exit_code == 0


def test_missing_intermediate(cli, pki, model):
    result = cli("sign", model, "--key", pki.key, "--cert", pki.leaf_crt)  # no --chain
    assert result.exit_code == 0, result.stderr
    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 4
    assert ("the leaf certificate 'CN=ML Release Signer,O=Example Org' was issued by 'CN=Example Signing CA,"
            "O=Example Org', which is neither in the bundle nor among the --ca roots") in _one_line(result.stderr)
    assert "an intermediate certificate is missing" in _one_line(result.stderr)
    # trusting the intermediate itself (a CA, narrower than the root) is the verifier's choice, and then the chain
    # is complete; model_signing's OpenSSL store wants a self-signed anchor and refuses this one
    assert cli("verify", model, "--ca", pki.int_crt).exit_code == 0


def test_self_signed_leaf_given_as_its_own_root_is_refused(cli, pki, model, tmp_path):
    """OMS §8.2 validates "the certificate chain ... against the trusted root CA": a certificate trusted as itself
    is a pinned key (the key method), not a chain to a CA, so msov refuses it rather than let it pass as one."""
    self_signed = _issue("Lone Signer", load_private_key(pki.key), None, ca=False)
    crt = _write(tmp_path / "self.crt", self_signed)
    assert cli("sign", model, "--key", pki.key, "--cert", crt).exit_code == 0
    result = cli("verify", model, "--ca", crt)
    assert result.exit_code == 4
    assert "the leaf certificate 'CN=Lone Signer,O=Example Org' is itself a --ca root" in _one_line(result.stderr)
    assert "the key method" in result.stderr
    # model_signing 1.1.1 (OpenSSL's store) accepts it: a deliberate difference
    pytest.importorskip("model_signing")
    sig = tmp_path / "self.sig"
    assert _model_signing("sign", "certificate", model, "--signature", sig, "--private_key", pki.key,
                          "--signing_certificate", crt, "--certificate_chain", crt).returncode == 0
    assert _model_signing("verify", "certificate", model, "--signature", sig, "--certificate_chain", crt) \
        .returncode == 0
    assert cli("verify", model, "--ca", crt, "--sig", sig).exit_code == 4


def test_leaf_issued_by_a_non_ca_is_refused(cli, pki, model, tmp_path):
    """An end-entity certificate that signs another is no CA, even under the right root (basicConstraints)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    middle_key = ec.generate_private_key(ec.SECP256R1())
    middle = _issue("Not A CA", middle_key.public_key(), (pki.root, pki.root_key), ca=False)
    leaf = _issue("Sneaky Signer", pki.leaf_public, (middle, middle_key), ca=False)
    crt, chain = _write(tmp_path / "sneaky.crt", leaf), _write(tmp_path / "middle.crt", middle)
    assert cli("sign", model, "--key", pki.key, "--cert", crt, "--chain", chain).exit_code == 0
    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 4
    assert ("the certificate chain to the --ca root is not valid: basicConstraints.cA must be asserted in a CA "
            "certificate") in _one_line(result.stderr)


def test_path_length_is_enforced(cli, pki, model, tmp_path):
    """The intermediate has pathLen 0: a CA it certifies may not issue the leaf."""
    from cryptography.hazmat.primitives.asymmetric import ec

    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = _issue("Sub CA", sub_key.public_key(), (pki.inter, pki.int_key), ca=True)
    leaf = _issue("Deep Signer", pki.leaf_public, (sub, sub_key), ca=False)
    crt, sub_crt = _write(tmp_path / "deep.crt", leaf), _write(tmp_path / "sub.crt", sub)
    assert cli("sign", model, "--key", pki.key, "--cert", crt, "--chain", sub_crt, "--chain", pki.int_crt) \
        .exit_code == 0
    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 4 and "path length constraint violated" in _one_line(result.stderr), result.stderr


def test_tampered_file_and_tampered_chain(cli, pki, model):
    _sign(cli, pki, model)
    (model / "adapter_config.json").write_text('{"r": 64}\n')
    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 4 and "adapter_config.json" in result.stderr and "does not match" in result.stderr
    (model / "adapter_config.json").write_text('{"r": 8}\n')
    assert cli("verify", model, "--ca", pki.root_crt).exit_code == 0

    # another valid certificate from the same CA, for another key, swapped into the bundle: the chain still holds,
    # the signature does not
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    other = _issue("Someone Else", ec.generate_private_key(ec.SECP256R1()).public_key(), (pki.inter, pki.int_key),
                   ca=False)
    bundle = json.loads(_sig(model).read_text())
    certificates = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"]
    certificates[0]["rawBytes"] = base64.b64encode(other.public_bytes(Encoding.DER)).decode()
    _sig(model).write_text(json.dumps(bundle))
    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 4
    assert ("the signature does not verify with the certificate of 'CN=Someone Else,O=Example Org'"
            in _one_line(result.stderr))


def test_method_and_options_must_agree(cli, pki, model, tmp_path):
    _sign(cli, pki, model)
    result = cli("verify", model, "--key", pki.pub)
    assert result.exit_code == 4
    assert "is certificate-signed (its certificate names 'CN=ML Release Signer,O=Example Org')" \
        in _one_line(result.stderr)
    assert "--ca ROOT.crt" in result.stderr

    key_signed = tmp_path / "key.sig"
    sign_folder(model, pki.key, sig_path=key_signed)
    result = cli("verify", model, "--ca", pki.root_crt, "--sig", key_signed)
    assert result.exit_code == 4 and "is key-signed (key hint" in _one_line(result.stderr)
    assert "--key SIGNER.pub" in result.stderr
    ok = cli("verify", model, "--key", pki.pub, "--sig", key_signed, "--explain")
    assert ok.exit_code == 0 and f"method key: the public key {pki.pub}" in _one_line(ok.stdout)

    assert cli("verify", model).exit_code == 2
    both = cli("verify", model, "--key", pki.pub, "--ca", pki.root_crt)
    assert both.exit_code == 2 and "not both" in both.stderr


def test_bad_inputs_name_the_file(cli, pki, model, tmp_path):
    _sign(cli, pki, model)
    result = cli("verify", model, "--ca", pki.key)  # a private key, not a certificate
    assert result.exit_code == 3 and f"--ca {pki.key}: not a PEM or DER X.509 certificate" in result.stderr
    result = cli("verify", model, "--ca", tmp_path / "nowhere.crt")
    assert result.exit_code == 3 and "no such file" in result.stderr
    bundle = json.loads(_sig(model).read_text())
    bundle["verificationMaterial"]["publicKey"] = {"hint": "00" * 32}
    _sig(model).write_text(json.dumps(bundle))
    result = cli("verify", model, "--ca", pki.root_crt)
    assert result.exit_code == 4 and "exactly one of publicKey" in _one_line(result.stderr)


def test_verify_chain_at_a_given_time(pki):
    """A caller holding a trusted time (an RFC 3161 timestamp over the signature) validates the chain then."""
    from cryptography.hazmat.primitives.serialization import Encoding

    chain = [pki.leaf.public_bytes(Encoding.DER), pki.inter.public_bytes(Encoding.DER)]
    _, report = verify_chain(chain, [pki.root_crt], at=NOW + dt.timedelta(days=1))
    assert report["validated_at"].startswith((NOW + dt.timedelta(days=1)).strftime("%Y-%m-%d"))
    with pytest.raises(VerificationError, match="is not valid before"):
        verify_chain(chain, [pki.root_crt], at=NOW - dt.timedelta(days=3))
    with pytest.raises(VerificationError, match="expired on"):
        verify_chain(chain, [pki.root_crt], at=NOW + dt.timedelta(days=31))


def test_expired_intermediate_is_named(pki):
    """RFC 5280 path validation checks every certificate of the path at the same time, not the leaf alone."""
    from cryptography.hazmat.primitives.serialization import Encoding

    old = _issue("Example Signing CA", pki.int_key.public_key(), (pki.root, pki.root_key), ca=True, days=(-60, -1))
    chain = [pki.leaf.public_bytes(Encoding.DER), old.public_bytes(Encoding.DER)]
    with pytest.raises(VerificationError, match="the chain certificate 'CN=Example Signing CA,O=Example Org' "
                                                "expired on"):
        verify_chain(chain, [pki.root_crt], where="old.sig")


def test_signer_refuses_a_not_yet_valid_leaf(pki):
    future = pki.write_leaf("future.crt", "Future Signer", days=(2, 30))
    with pytest.raises(InputError, match="is not valid before"):
        CertificateSigner(KeyFileSigner(pki.key), future, (pki.int_crt,))


# -- the spec's own vector -----------------------------------------------------------------------------------------

def test_spec_certificate_vector(tmp_path):
    """test-vectors/valid/certificate.bundle.json signs a model we do not have, and its root ('CN=root-ca') is not
    published. What can be checked: the bundle parses, its chain reads (P-384 leaf, RSA intermediate), the leaf is
    signed by the intermediate and is fit for signing, the DSSE signature verifies with the leaf's key, and the
    whole certificate path validates when the intermediate is the trust anchor. Only the files stay unchecked."""
    vector = SPEC / "test-vectors" / "valid" / "certificate.bundle.json"
    if not vector.is_file():
        pytest.skip(f"OMS spec not found at {SPEC}")
    from cryptography import x509

    bundle = json.loads(vector.read_text())
    chain = chain_from_bundle(bundle["verificationMaterial"])
    leaf, inter = (x509.load_der_x509_certificate(d) for d in chain)
    assert leaf_claims(chain)["subject"] == "CN=intermediate-ca" and inter.issuer.rfc4514_string() == "CN=root-ca"
    leaf.verify_directly_issued_by(inter)
    anchor = _write(tmp_path / "intermediate-ca.crt", inter)
    payload, signer = _check_envelope(bundle, vector, None, (anchor,))
    assert json.loads(payload)["predicateType"] == "https://model_signing/signature/v1.0"
    assert signer["method"] == "certificate" and signer["curve"] == "secp384r1"
    assert signer["issuers"] == ["CN=intermediate-ca"] and signer["not_after"] == "2035-04-30T23:36:28Z"
    # without the intermediate as anchor, what is missing is named: its root
    from cryptography.hazmat.primitives.asymmetric import ec

    unrelated_key = ec.generate_private_key(ec.SECP256R1())
    unrelated = _write(tmp_path / "unrelated.crt", _issue("Unrelated Root", unrelated_key, None, ca=True))
    with pytest.raises(VerificationError, match="issued by 'CN=root-ca', which is not among the --ca roots"):
        _check_envelope(bundle, vector, None, (unrelated,))
