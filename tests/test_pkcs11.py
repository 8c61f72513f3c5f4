"""Signing keys that never leave an HSM: RFC 7512 URIs, key pairs made inside a real SoftHSM2 token, signatures the
token makes checked by cryptography, by msov's verify and by the reference verifier (model_signing), and every
bad case (wrong PIN, missing object, malformed URI) an InputError that never shows the PIN."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_signing import _model_signing  # the reference verifier, run offline

from mistral_sov.errors import InputError, UsageError
from mistral_sov.trust.pkcs11 import Pkcs11Signer, generate_keypair, parse_uri, redact_uri

PIN, SO_PIN = "pin-7319-secret", "so-4482-secret"
TOKEN = "msov-test"
MODULE_PLACES = ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                 "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so", "/usr/local/lib/softhsm/libsofthsm2.so"]
INSTALL_BUDGET_S = 120


# -- SoftHSM2: installed when missing (root, apt), else the tests that need it are skipped with the reason -------

def _install_softhsm2() -> str | None:
    """None when softhsm2-util is there (installing it if need be), else why it is not."""
    if shutil.which("softhsm2-util"):
        return None
    if not shutil.which("apt-get"):
        return "softhsm2-util is not installed and there is no apt-get to install SoftHSM2 with"
    if os.geteuid() != 0:
        return "softhsm2-util is not installed and installing SoftHSM2 (apt-get install softhsm2) needs root"
    deadline = time.monotonic() + INSTALL_BUDGET_S
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "softhsm2"]
    # the package lists may never have been fetched in a fresh container: update once, then try again
    for step in (install, ["apt-get", "update"], install):
        try:
            done = subprocess.run(step, capture_output=True, text=True, env=env,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"installing SoftHSM2 took over {INSTALL_BUDGET_S} s (`{' '.join(step)}`)"
        if step is install and done.returncode == 0:
            return None
        if step is not install and done.returncode != 0:
            return f"`apt-get update` failed: {done.stderr.strip()[-300:]}"
    return f"`apt-get install softhsm2` failed: {done.stderr.strip()[-300:]}"


def _module_library() -> str | None:
    for place in MODULE_PLACES:
        if Path(place).is_file():
            return place
    for package in ("libsofthsm2", "softhsm2"):
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True) \
            if shutil.which("dpkg") else None
        for line in (listed.stdout.splitlines() if listed and listed.returncode == 0 else []):
            if line.endswith("/libsofthsm2.so") and Path(line).is_file():
                return line
    return None


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    """A fresh SoftHSM2 token (user PIN, SO PIN) in a temporary folder: {"module", "token", "pin_file", ...}."""
    pytest.importorskip("pkcs11", reason="python-pkcs11 (extra `hsm`) is not installed")
    started = time.monotonic()
    why = _install_softhsm2()
    if why:
        pytest.skip(why)
    module = _module_library()
    if module is None:
        pytest.skip("SoftHSM2 is installed but its module libsofthsm2.so was not found")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
                    f"slots.removable = false\n")
    with pytest.MonkeyPatch.context() as patch:
        # the module reads its configuration when first loaded, which is in this process, after this point
        patch.setenv("SOFTHSM2_CONF", str(conf))
        for name in ("MSOV_PKCS11_MODULE", "MSOV_PKCS11_PIN"):
            patch.delenv(name, raising=False)
        done = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN,
                               "--so-pin", SO_PIN], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        pin_file = root / "user.pin"
        pin_file.write_text(PIN + "\n")
        yield {"module": module, "conf": conf, "pin_file": pin_file, "setup_s": time.monotonic() - started,
               "uri": lambda obj, **query: _uri(module, obj, pin_file, **query)}


def _uri(module: str, obj: str, pin_file: Path, **query) -> str:
    query = {"module-path": module, "pin-source": f"file:{pin_file}", **query}
    return f"pkcs11:token={TOKEN};object={obj}?" + "&".join(f"{k}={v}" for k, v in query.items() if v is not None)


@pytest.fixture(scope="module")
def keys(hsm):
    """One key pair per curve, made inside the token."""
    return {curve: generate_keypair(hsm["uri"](f"signer-{curve}"), curve=curve) for curve in ("P-256", "P-384")}


# -- RFC 7512 parsing (no token needed) ----------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    ("pkcs11:", {}),
    ("pkcs11:object=my-pubkey;type=public", {"object": "my-pubkey", "type": "public"}),
    ("pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
     {"object": "my-key", "type": "private", "pin-source": "file:/etc/token"}),
    (("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
      "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin"),
     {"token": "The Software PKCS#11 Softtoken", "manufacturer": "Snake Oil, Inc.", "model": "1.0",
      "object": "my-certificate", "type": "cert", "id": bytes.fromhex("69953e5cf4bdec91"), "serial": "",
      "pin-source": "file:/etc/token_pin"}),
    ("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
     {"object": "my-sign-key", "type": "private", "module-name": "mypkcs11"}),
    ("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
     {"object": "my-sign-key", "type": "private", "module-path": "/mnt/libmypkcs11.so.1"}),
    ("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
     {"token": "Software PKCS#11 softtoken", "manufacturer": "Snake Oil, Inc.", "pin-value": "the-pin"}),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot-description": "Sun Metaslot"}),
    (("pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
      "library-version=1.23"),
     {"library-manufacturer": "Snake Oil, Inc.", "library-description": "Soft Token Library",
      "library-version": "1.23"}),
    ("pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
     {"token": "My token% created by Joe", "library-version": "3", "id": bytes.fromhex("010203baddcafe040506")}),
    ("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
     {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"}),
    ("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
     {"token": "Name with a small A with acute: \u00e1", "object": "my-certificate", "type": "cert"}),
    (("pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
      "?pin-source=file:/etc/token_pin&vendor-bbb=value-b"),
     {"token": "my-token", "object": "my-certificate", "type": "cert", "vendor-aaa": "value-a",
      "pin-source": "file:/etc/token_pin", "vendor-bbb": "value-b"}),
    # the characters each part may hold unencoded ("&" in the path, "/", "?" and "|" in the query)
    ("pkcs11:token=:[]@!$'()*+,=&?module-path=:[]@!$'()*+,=/?|",
     {"token": ":[]@!$'()*+,=&", "module-path": ":[]@!$'()*+,=/?|"}),
    ("PKCS11:slot-id=7", {"slot-id": 7}),
])
def test_parse_rfc7512_examples(uri, expected):
    assert parse_uri(uri) == expected


@pytest.mark.parametrize("uri, problem", [
    ("pkcs12:token=x", "must start with 'pkcs11:'"),
    ("token=x;object=y", "must start with 'pkcs11:'"),
    ("pkcs11:token=a%2", "'%' not followed by two hex digits"),
    ("pkcs11:object=a%zzb", "'%' not followed by two hex digits"),
    ("pkcs11:token=my token", "must be percent-encoded \\(' '\\)"),
    ("pkcs11:token=a/b", "must be percent-encoded \\('/'\\)"),
    ("pkcs11:token=x?pin-source=a&b", "'b' with no '=value'"),
    ("pkcs11:token=x;;object=y", "empty attribute"),
    ("pkcs11:token", "'token' with no '=value'"),
    ("pkcs11:token=a;token=b", "'token' appears twice"),
    ("pkcs11:type=secret", "type=secret is none of"),
    ("pkcs11:slot-id=one", "slot-id=one is not a decimal number"),
    ("pkcs11:library-version=1.2.3", "library-version=1.2.3 is not MAJOR"),
    ("pkcs11:token=%FF%FE", "not UTF-8 once percent-decoded"),
    ("pkcs11:module-path=/x.so", "belongs in the query"),
    ("pkcs11:?object=k", "belongs in the path"),
    ("pkcs11:b@d=1", "not an attribute name"),
    ("pkcs11:token=x#frag", "'#' is not allowed"),
    ("pkcs11:?pin-value=1&pin-source=file:/p", "both pin-value and pin-source"),
])
def test_malformed_uris_are_input_errors_naming_the_problem(uri, problem):
    with pytest.raises(InputError, match=problem):
        parse_uri(uri)


@pytest.mark.parametrize("uri, problem", [
    ("pkcs11:token=x?pin-value=s3cr3t pin", "'pin-value' holds a character that must be percent-encoded\\.$"),
    ("pkcs11:token=x?pin-value=s3cr3t&pin", "an attribute with no '=value'"),  # "&" in a PIN must be %26
    ("pkcs11:token=x?pin-value=s3cr3t&p@n=1", "the query holds a malformed attribute name"),
    ("pkcs11:token=x?pin-value=s3cr3t&pin=a b", "a query attribute holds a character that must be"),
])
def test_a_malformed_pin_value_is_never_quoted(uri, problem):
    with pytest.raises(InputError, match=problem) as caught:
        parse_uri(uri)
    assert "s3cr3t" not in caught.value.message and "pin'" not in caught.value.message
    assert "(' ')" not in caught.value.message and "p@n" not in caught.value.message


def test_redact_uri_drops_only_the_pin_value():
    assert redact_uri("pkcs11:token=t;object=k?pin-value=1234&module-path=/m.so") == \
        "pkcs11:token=t;object=k?module-path=/m.so"
    assert redact_uri("pkcs11:token=t?pin-value=1234") == "pkcs11:token=t"
    assert redact_uri("pkcs11:token=t;object=k") == "pkcs11:token=t;object=k"


def test_importing_the_module_loads_no_pkcs11_library():
    code = "import sys, mistral_sov.trust.pkcs11; sys.exit('pkcs11' in sys.modules or 'asn1crypto' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- keys made inside the token ------------------------------------------------------------------------------------

def test_keygen_makes_a_sensitive_key_pair_in_the_token_and_never_overwrites_one(hsm, keys):
    import pkcs11
    from cryptography.hazmat.primitives import serialization

    made = keys["P-256"]
    assert made["curve"] == "P-256" and len(made["key_hint"]) == 64
    public = serialization.load_pem_public_key(made["public_pem"].encode())
    assert public.curve.name == "secp256r1"
    # the URI it returns names this very key (its id added) and carries no PIN
    attrs = parse_uri(made["uri"])
    assert attrs["object"] == "signer-P-256" and len(attrs["id"]) == 16 and "pin-value" not in attrs
    with Pkcs11Signer(made["uri"]) as signer:
        assert signer.key_hint == made["key_hint"]

    # the private key in the token: sensitive, never extractable, its value unreadable by anyone
    token = pkcs11.lib(hsm["module"]).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        private = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="signer-P-256")
        assert private[pkcs11.Attribute.SENSITIVE] and private[pkcs11.Attribute.ALWAYS_SENSITIVE]
        assert not private[pkcs11.Attribute.EXTRACTABLE] and private[pkcs11.Attribute.NEVER_EXTRACTABLE]
        assert private[pkcs11.Attribute.TOKEN] and private[pkcs11.Attribute.PRIVATE]
        with pytest.raises(pkcs11.AttributeSensitive):
            private[pkcs11.Attribute.VALUE]

    with pytest.raises(InputError, match="already holds an object with this label; msov never overwrites a key"):
        generate_keypair(hsm["uri"]("signer-P-256"))
    taken_id = "".join(f"%{b:02X}" for b in attrs["id"])
    with pytest.raises(InputError, match="already holds an object with this id"):
        generate_keypair(hsm["uri"]("another-label").replace("?", f";id={taken_id}?"))
    with pytest.raises(UsageError, match="--curve P-224"):
        generate_keypair(hsm["uri"]("k224"), curve="P-224")
    with pytest.raises(InputError, match="names no key"):
        generate_keypair(f"pkcs11:token={TOKEN}?module-path={hsm['module']}&pin-source=file:{hsm['pin_file']}")


@pytest.mark.parametrize("curve, hash_name", [("P-256", "SHA256"), ("P-384", "SHA384")])
def test_token_signatures_are_der_ecdsa_that_verify_with_the_public_key(hsm, keys, curve, hash_name):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    message = b"DSSEv1 28 application/vnd.in-toto+json 2 {}"
    with Pkcs11Signer(keys[curve]["uri"]) as signer:
        signature = signer.sign(message)
        other = signer.sign(message)
        assert signer.describe() == {"method": "pkcs11", "key_hint": keys[curve]["key_hint"],
                                     "uri": keys[curve]["uri"]}
        assert signer.material() == {"publicKey": {"hint": keys[curve]["key_hint"]}}
    assert signer.public_key.curve.name == {"P-256": "secp256r1", "P-384": "secp384r1"}[curve]
    algorithm = ec.ECDSA(getattr(hashes, hash_name)())
    signer.public_key.verify(signature, message, algorithm)  # raises when wrong
    signer.public_key.verify(other, message, algorithm)
    assert signature != other  # ECDSA's nonce: a fresh signature each time
    assert encode_dss_signature(*decode_dss_signature(signature)) == signature and signature[0] == 0x30
    with pytest.raises(InvalidSignature):
        signer.public_key.verify(signature, message + b"!", algorithm)


def test_a_folder_signed_by_the_token_verifies_with_msov_and_with_model_signing(hsm, keys, tmp_path):
    pytest.importorskip("model_signing")
    from mistral_sov.trust.oms import sign_folder, verify_folder

    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    public = tmp_path / "signer.pub"
    public.write_text(keys["P-256"]["public_pem"])
    sig = tmp_path / "adapter.sig"
    with Pkcs11Signer(keys["P-256"]["uri"]) as signer:
        result = sign_folder(folder, signer, sig_path=sig)
    assert result["key_hint"] == keys["P-256"]["key_hint"] and result["files"] == 2
    report = verify_folder(folder, public, sig_path=sig)
    assert report["subject_digest"] == result["subject_digest"]

    done = _model_signing("verify", "key", folder, "--signature", sig, "--public_key", public)
    assert done.returncode == 0 and "Verification succeeded" in done.stdout, done.stdout + done.stderr
    (folder / "adapter_config.json").write_text('{"r": 16}')  # and it really checks the files
    done = _model_signing("verify", "key", folder, "--signature", sig, "--public_key", public)
    assert done.returncode != 0


def test_the_pin_from_a_file_the_environment_or_the_uri(hsm, keys, monkeypatch, tmp_path):
    base = keys["P-256"]["uri"]
    (tmp_path / "crlf.pin").write_bytes(PIN.encode() + b"\r\n")  # a PIN file saved on Windows
    with Pkcs11Signer(base.replace(str(hsm["pin_file"]), str(tmp_path / "crlf.pin"))) as signer:
        assert signer.key_hint == keys["P-256"]["key_hint"]
    with_value = base.replace(f"pin-source=file:{hsm['pin_file']}", f"pin-value={PIN}")
    with Pkcs11Signer(with_value) as signer:
        assert PIN not in str(signer.describe()) and signer.describe()["uri"] == redact_uri(with_value)
    monkeypatch.setenv("MSOV_PKCS11_PIN", PIN)
    monkeypatch.setenv("MSOV_PKCS11_MODULE", hsm["module"])
    with Pkcs11Signer(f"pkcs11:token={TOKEN};object=signer-P-384") as signer:
        assert signer.key_hint == keys["P-384"]["key_hint"]
    # two signers on one token at once: PKCS#11 logs in per token, and closing one must not log out the other
    with Pkcs11Signer(base) as first, Pkcs11Signer(keys["P-384"]["uri"]) as second:
        first.close()
        second.public_key.verify(second.sign(b"m"), b"m", _ecdsa(second.public_key))


# -- the bad cases: one clear InputError each, never the PIN -------------------------------------------------------

def test_bad_cases_are_clear_input_errors_that_never_show_the_pin(hsm, keys, tmp_path, monkeypatch):
    wrong = "wrong-5150-pin"
    wrong_file = tmp_path / "wrong.pin"
    wrong_file.write_text(wrong)
    good = keys["P-256"]["uri"]
    cases = {
        "the token refused the PIN \\(wrong PIN\\)": good.replace(str(hsm["pin_file"]), str(wrong_file)),
        "the token refused the PIN": good.replace(f"pin-source=file:{hsm['pin_file']}", f"pin-value={wrong}"),
        "the token holds no private key with this label/id": hsm["uri"]("no-such-key"),
        "no token matches token=nope \\(tokens there: 'msov-test'\\)": good.replace(f"token={TOKEN}", "token=nope"),
        "no such file": good.replace(hsm["module"], "/nonexistent/libnothing.so"),
        "no module library is named": good.replace(f"module-path={hsm['module']}&", ""),
        "needs its user PIN and none was given": good.replace(f"&pin-source=file:{hsm['pin_file']}", ""),
        "pin-source .*: cannot read it": good.replace(str(hsm["pin_file"]), str(tmp_path / "none.pin")),
        "type=public names no private key": good.replace("?", ";type=public?"),
        "'%' not followed by two hex digits": good.replace("object=", "object=%G1"),
        "is not one msov can match": good.replace("?", ";x-vendor=1?"),
    }
    messages = []
    for problem, uri in cases.items():
        with pytest.raises(InputError, match=problem) as caught:
            Pkcs11Signer(uri)
        messages.append(f"{caught.value.message} {caught.value.hint}")
    # a wrong PIN is refused the same way while another signer holds the token's login
    with Pkcs11Signer(good):
        with pytest.raises(InputError, match="wrong PIN") as caught:
            Pkcs11Signer(good.replace(str(hsm["pin_file"]), str(wrong_file)))
        messages.append(f"{caught.value.message} {caught.value.hint}")
    with pytest.raises(InputError, match="wrong PIN") as caught:
        generate_keypair(hsm["uri"]("fresh", **{"pin-source": f"file:{wrong_file}"}))
    messages.append(f"{caught.value.message} {caught.value.hint}")
    for message in messages:
        assert PIN not in message and wrong not in message, message
    # and the right PIN still works after all those refusals (nothing left logged in or locked)
    with Pkcs11Signer(good) as signer:
        assert signer.key_hint == keys["P-256"]["key_hint"]


def test_a_key_that_is_not_ec_is_refused(hsm):
    import pkcs11

    token = pkcs11.lib(hsm["module"]).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN, rw=True) as session:
        session.generate_keypair(pkcs11.KeyType.RSA, 2048, label="rsa-key", store=True)
    with pytest.raises(InputError, match="the key is RSA, not an EC key"):
        Pkcs11Signer(hsm["uri"]("rsa-key"))


# -- helpers -------------------------------------------------------------------------------------------------------

def _ecdsa(public_key):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.ECDSA(getattr(hashes, {"secp256r1": "SHA256", "secp384r1": "SHA384"}[public_key.curve.name])())


def test_cli_keygen_in_the_token_then_a_run_signed_by_it_verifies(hsm, tiny_model, tmp_path, cli, write_recipe):
    """The user's path: `msov keygen --pkcs11 URI --out KEYBASE`, a recipe whose output.sign_key is the URI (no
    key file anywhere), `msov verify` with the public key keygen wrote."""
    from conftest import small_recipe

    uri = hsm["uri"]("run-signer")
    made = cli("keygen", "--pkcs11", uri, "--out", tmp_path / "run-signer", "--json")
    assert made.exit_code == 0, made.output
    answer = json.loads(made.stdout)
    assert answer["in_token"] and "pin-value" not in answer["private_key"] and PIN not in made.stdout
    public = tmp_path / "run-signer.pub"
    assert public.read_text() == answer["public_pem"]
    again = cli("keygen", "--pkcs11", uri, "--json")  # never a second key under one label
    assert again.exit_code == 3 and json.loads(again.stdout)["status"] == "error"

    recipe = small_recipe(tiny_model, tmp_path / "run", max_steps=2)
    recipe["output"]["sign_key"] = answer["private_key"]  # the URI keygen returned (id added, no PIN)
    trained = cli("finetune", write_recipe(recipe), "--json")
    assert trained.exit_code == 0, trained.output
    checked = cli("verify", tmp_path / "run" / "adapter", "--key", public, "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["key"]["hint"] == answer["key_hint"]
    wrong_pin_file = tmp_path / "wrong.pin"
    wrong_pin_file.write_text("0000\n")
    wrong_pin = hsm["uri"]("run-signer", **{"pin-source": f"file:{wrong_pin_file}"})
    refused = cli("finetune", write_recipe({**recipe, "output": {**recipe["output"], "sign_key": wrong_pin,
                                                                  "dir": str(tmp_path / "run2")}}, "r2.yaml"),
                  "--json")
    assert refused.exit_code == 3 and "0000" not in refused.stdout and not (tmp_path / "run2.partial").exists()
    assert "PIN" in json.loads(refused.stdout)["error"]
    # a PIN written into a recipe would be recorded in the signed provenance: refused before anything runs
    in_recipe = hsm["uri"]("run-signer", **{"pin-source": None, "pin-value": PIN})
    leaked = cli("finetune", write_recipe({**recipe, "output": {**recipe["output"], "sign_key": in_recipe,
                                                                 "dir": str(tmp_path / "run3")}}, "r3.yaml"),
                 "--json")
    assert leaked.exit_code == 3 and "pin-value" in json.loads(leaked.stdout)["error"] and PIN not in leaked.stdout


def test_a_pin_on_the_command_line_works_but_is_warned_about(hsm, keys, cli, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x01" * 64)
    uri = hsm["uri"]("signer-P-256", **{"pin-source": None, "pin-value": PIN})
    signed = cli("sign", folder, "--key", uri, "--json")
    assert signed.exit_code == 0, signed.output
    assert "visible to other users" in signed.stderr and PIN not in signed.stdout + signed.stderr
    assert json.loads(signed.stdout)["key_hint"] == keys["P-256"]["key_hint"]
