"""Signing and verification for real: a fine-tuned adapter signed by `finetune`, every tamper case the issue
names failing with exit 4 and a message naming the problem, OMS schema conformance, and the independent
reference verifier (`model_signing`) accepting msov's signatures with the network off."""

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_recipe

from mistral_sov.recipe import load_recipe
from mistral_sov.train.pipeline import finetune
from mistral_sov.trust.hashing import DEFAULT_IGNORE, describe_folder, digest_folder, hash_files, sha256_file
from mistral_sov.trust.keys import generate_keypair
from mistral_sov.trust.oms import make_statement, pae, sign_folder, verify_folder

SCHEMA_PLACES = [REPO / "tests" / "oms" / "predicate.schema.v1.0.json",
                 REPO.parent / "shared" / "oms" / "predicate.schema.v1.0.json"]


@pytest.fixture(scope="module")
def signed_run(tiny_model, tmp_path_factory):
    """A real two-step fine-tune whose recipe names a key (relative to the recipe): adapter/ + adapter.sig."""
    root = tmp_path_factory.mktemp("signed")
    private, public = generate_keypair(root / "keys" / "signer")
    data = small_recipe(tiny_model, root / "out", max_steps=2)
    data["output"]["sign_key"] = "keys/signer.pem"
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    summary = finetune(load_recipe(root / "r.yaml"))
    return summary, root / "out", public


@pytest.fixture
def run_copy(signed_run, tmp_path):
    _, out, public = signed_run
    target = tmp_path / "run"
    shutil.copytree(out, target, symlinks=True)
    return target, public


def payload_of(sig: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))


# -- the round trip ------------------------------------------------------------------------------------------------

def test_finetune_signs_before_publishing_and_records_it(signed_run):
    summary, out, _ = signed_run
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "adapter.sig", "inputs.json", "loss.png",
                                                     "metrics.jsonl", "recipe.yaml", "run.json"]
    run = json.loads((out / "run.json").read_text())
    statement = payload_of(out / "adapter.sig")
    assert run["signature"]["path"] == str(out / "adapter.sig")
    assert run["adapter_digest"] == statement["subject"][0]["digest"]["sha256"] == summary.adapter_digest
    assert statement["subject"][0]["name"] == "adapter"
    names = [r["name"] for r in statement["predicate"]["resources"]]
    assert {"adapter_model.safetensors", "adapter_config.json", "msov/provenance.json"} <= set(names)
    assert not out.with_name("out.partial").exists()


def test_verify_round_trip_and_explain(cli, signed_run):
    summary, out, public = signed_run
    result = cli("verify", out / "adapter", "--key", public, "--explain")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "verified" in text and summary.adapter_digest in text
    assert str(summary.base_model.path) in text and "model.safetensors" in text
    assert "helpdesk_chat.jsonl" in text and "300 rows" in text and summary.recipe_digest in text
    assert "SHA256:" in text and summary.started_at in text and "transformers" in text

    as_json = json.loads(cli("verify", out / "adapter", "--key", public, "--json").stdout)
    assert as_json["status"] == "verified" and as_json["subject_digest"] == summary.adapter_digest
    assert as_json["provenance"]["recipe_digest"] == summary.recipe_digest


def test_provenance_digests_match_the_signed_resources(signed_run):
    summary, out, public = signed_run
    report = verify_folder(out / "adapter", public)
    resources = {f["name"]: f["digest"] for f in report["files"]}
    provenance = report["provenance"]
    assert provenance["predicateType"] == "https://slsa.dev/provenance/v1"
    assert provenance["subject"], "the weight files are the subject"
    for subject in provenance["subject"]:
        assert resources[subject["name"]] == subject["digest"]["sha256"]
    assert resources["adapter_model.safetensors"] == sha256_file(out / "adapter" / "adapter_model.safetensors")

    build = provenance["predicate"]["buildDefinition"]
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    for name, digest in summary.base_model.files.items():
        assert deps[f"base_model/{name}"]["digest"]["sha256"] == digest
    for item in summary.data.train:
        dep = deps[f"data/train/{Path(item.path).name}"]
        assert dep["digest"]["sha256"] == item.sha256 == sha256_file(item.path)
        assert dep["annotations"]["rows"] == item.rows and dep["annotations"]["format"] == item.format
    assert build["externalParameters"]["recipe_digest"] == summary.recipe_digest
    assert build["externalParameters"]["recipe"]["train"]["seed"] == summary.seed
    run = provenance["predicate"]["runDetails"]
    versions = set(run["builder"]["version"])
    assert {"msov", "torch", "transformers", "peft", "accelerate", "datasets", "python"} <= versions
    assert run["metadata"]["startedOn"] == summary.started_at and run["metadata"]["finishedOn"]
    assert run["byproducts"][0]["annotations"]["eval"]["after"]["loss"] == summary.eval.after.loss
    assert build["internalParameters"]["hardware"]["cpu_count"]


def test_provenance_that_disagrees_with_the_signed_weights_fails(cli, run_copy, tmp_path):
    """Signed as it is, but its provenance describes other weights: the folder does not say what it claims."""
    run, _ = run_copy
    path = run / "adapter" / "msov" / "provenance.json"
    doc = json.loads(path.read_text())
    doc["subject"][0]["digest"]["sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    private, public = generate_keypair(tmp_path / "k")
    sign_folder(run / "adapter", private)
    result = cli("verify", run / "adapter", "--key", public)
    assert result.exit_code == 4
    assert "provenance.json: records sha256 000000000000… for adapter_model.safetensors" in result.stderr


def test_predicate_matches_the_oms_schema(signed_run):
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = next((p for p in SCHEMA_PLACES if p.is_file()), None)
    if schema_path is None:
        pytest.skip(f"OMS predicate schema not found in {', '.join(map(str, SCHEMA_PLACES))}")
    schema = json.loads(schema_path.read_text())
    _, out, _ = signed_run
    bundle = json.loads((out / "adapter.sig").read_text())
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    statement = payload_of(out / "adapter.sig")
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    jsonschema.validate(statement["predicate"], schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema really is strict: an extra field fails
        jsonschema.validate({**statement["predicate"], "extra": 1}, schema)
    concatenated = b"".join(bytes.fromhex(r["digest"]) for r in statement["predicate"]["resources"])
    assert statement["subject"][0]["digest"]["sha256"] == hashlib.sha256(concatenated).hexdigest()


def test_manifest_show_lists_files_without_a_signature(cli, signed_run):
    _, out, _ = signed_run
    result = cli("manifest", "show", out / "adapter", "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert {f["name"]: f["digest"] for f in shown["files"]} == digest_folder(out / "adapter")
    assert shown["subject_digest"] == json.loads((out / "run.json").read_text())["adapter_digest"]
    assert all(f["size"] == (out / "adapter" / f["name"]).stat().st_size for f in shown["files"])


# -- tampering: every case exits 4 and names what is wrong ---------------------------------------------------------

def _flip_byte(run: Path, public: Path):
    path = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "changed: adapter_model.safetensors"


def _add_file(run, public):
    (run / "adapter" / "notes.txt").write_text("not signed")
    return "added (not signed): notes.txt"


def _remove_file(run, public):
    (run / "adapter" / "adapter_config.json").unlink()
    return "removed: adapter_config.json"


def _rename_file(run, public):
    (run / "adapter" / "adapter_config.json").rename(run / "adapter" / "config.json")
    return "renamed: adapter_config.json -> config.json"


def _add_symlink(run, public):
    (run / "adapter" / "extra.json").symlink_to(run / "run.json")
    return "'extra.json' is a symbolic link"


def _add_fifo(run, public):
    os.mkfifo(run / "adapter" / "pipe")
    return "'pipe' is a special file"


def _edit_signature(run, public):
    bundle = json.loads((run / "adapter.sig").read_text())
    sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (run / "adapter.sig").write_text(json.dumps(bundle))
    return "the signature does not verify"


def _edit_payload(run, public):
    bundle = json.loads((run / "adapter.sig").read_text())
    statement = payload_of(run / "adapter.sig")
    statement["predicate"]["resources"] = [r for r in statement["predicate"]["resources"]
                                           if r["name"] != "adapter_config.json"]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (run / "adapter.sig").write_text(json.dumps(bundle))
    return "the signature does not verify"


def _truncate_bundle(run, public):
    text = (run / "adapter.sig").read_text()
    (run / "adapter.sig").write_text(text[: len(text) // 2])
    return "not a valid signature bundle"


def _wrong_key(run, public):
    _, other = generate_keypair(run.parent / "other-keys" / "other")
    public.write_bytes(other.read_bytes())
    return "signed by another key"


def _wrong_key_without_hint(run, public):
    _wrong_key(run, public)
    bundle = json.loads((run / "adapter.sig").read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    (run / "adapter.sig").write_text(json.dumps(bundle))
    return "the signature does not verify"


def _extra_ignore_path(run, public):
    """Validly signed, but it excuses a file from checking: ignore paths beyond the defaults are refused."""
    key = run.parent / "keys" / "signer.pem"
    statement = payload_of(run / "adapter.sig")
    statement["predicate"]["serialization"]["ignore_paths"].append("adapter_model.safetensors")
    _resign(run / "adapter.sig", statement, key)
    return "ignores paths beyond the defaults (adapter_model.safetensors)"


def _path_leaving_folder(run, public):
    key = run.parent / "keys" / "signer.pem"
    statement = payload_of(run / "adapter.sig")
    resources = statement["predicate"]["resources"] + [{"name": "../run.json", "algorithm": "sha256",
                                                        "digest": sha256_file(run / "run.json")}]
    fresh = make_statement("adapter", resources, statement["predicate"]["serialization"]["ignore_paths"])
    _resign(run / "adapter.sig", fresh, key)
    return "not a plain relative path inside the folder: '../run.json'"


def _resign(sig: Path, statement: dict, key_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    payload = json.dumps(statement).encode()
    bundle = json.loads(sig.read_text())
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    signature = key.sign(pae("application/vnd.in-toto+json", payload), ec.ECDSA(hashes.SHA256()))
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(signature).decode()
    sig.write_text(json.dumps(bundle))


TAMPERS = [_flip_byte, _add_file, _remove_file, _rename_file, _add_symlink, _add_fifo, _edit_signature,
           _edit_payload, _truncate_bundle, _wrong_key, _wrong_key_without_hint, _extra_ignore_path,
           _path_leaving_folder]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__.strip("_") for t in TAMPERS])
def test_tampering_fails_with_exit_4_naming_the_problem(cli, signed_run, tmp_path, tamper):
    _, out, public = signed_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.copytree(public.parent, tmp_path / "keys")
    key = tmp_path / "keys" / public.name
    assert cli("verify", run / "adapter", "--key", key).exit_code == 0
    expected = tamper(run, key)
    result = cli("verify", run / "adapter", "--key", key)
    assert result.exit_code == 4, result.output
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_failure_as_json_and_missing_signature(cli, run_copy):
    run, public = run_copy
    (run / "adapter.sig").unlink()
    result = cli("verify", run / "adapter", "--key", public, "--json")
    assert result.exit_code == 4
    error = json.loads(result.stdout)
    assert error["exit_code"] == 4 and "adapter.sig: no signature there" in error["error"]


# -- keys ------------------------------------------------------------------------------------------------------------

def test_keygen_writes_a_0600_private_key_and_never_overwrites(cli, tmp_path):
    result = cli("keygen", "--out", tmp_path / "k" / "alice", "--json")
    assert result.exit_code == 0, result.stderr
    private = tmp_path / "k" / "alice.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "k" / "alice.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert b"ENCRYPTED" not in private.read_bytes()
    again = cli("keygen", "--out", tmp_path / "k" / "alice")
    assert again.exit_code == 3 and "never overwrites a key" in again.stderr
    assert not list((tmp_path / "k").glob("*.tmp-*"))


def test_keygen_refuses_an_output_folder(cli, signed_run, tmp_path):
    _, out, _ = signed_run
    result = cli("keygen", "--out", out / "keys" / "k")
    assert result.exit_code == 3 and "inside an msov output folder" in result.stderr
    assert not (out / "keys").exists()


def test_encrypted_key_passphrase_from_environment(cli, run_copy, tmp_path, monkeypatch):
    run, _ = run_copy
    monkeypatch.setenv("MSOV_KEY_PASSPHRASE", "correct horse")
    assert cli("keygen", "--out", tmp_path / "enc", "--curve", "P-384").exit_code == 0
    assert b"ENCRYPTED" in (tmp_path / "enc.pem").read_bytes()
    signed = cli("sign", run / "adapter", "--key", tmp_path / "enc.pem", "--out", tmp_path / "a.sig", "--json")
    assert signed.exit_code == 0, signed.stderr
    assert cli("verify", run / "adapter", "--key", tmp_path / "enc.pub", "--sig", tmp_path / "a.sig").exit_code == 0
    monkeypatch.setenv("MSOV_KEY_PASSPHRASE", "wrong")
    wrong = cli("sign", run / "adapter", "--key", tmp_path / "enc.pem", "--out", tmp_path / "b.sig")
    assert wrong.exit_code == 3 and "passphrase is wrong" in wrong.stderr
    monkeypatch.delenv("MSOV_KEY_PASSPHRASE")
    missing = cli("sign", run / "adapter", "--key", tmp_path / "enc.pem", "--out", tmp_path / "b.sig")
    assert missing.exit_code == 3 and "MSOV_KEY_PASSPHRASE" in missing.stderr
    assert not (tmp_path / "b.sig").exists()


def test_finetune_sign_key_flag_is_checked_before_any_work(cli, write_recipe, tiny_model, tmp_path, monkeypatch):
    """A key that cannot be used must fail the run at once (exit 3), not after training; nothing is written."""
    monkeypatch.delenv("MSOV_KEY_PASSPHRASE", raising=False)
    private, _ = generate_keypair(tmp_path / "k", passphrase=b"secret")
    recipe = write_recipe(small_recipe(tiny_model, tmp_path / "out", max_steps=1))
    result = cli("finetune", recipe, "--sign-key", private)
    assert result.exit_code == 3, result.output
    assert f"{private}: the private key is encrypted" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_sign_refuses_a_key_inside_the_folder(run_copy, tmp_path):
    from mistral_sov.errors import InputError

    run, _ = run_copy
    private, _ = generate_keypair(tmp_path / "k")
    shutil.copy(private, run / "adapter" / "key.pem")
    with pytest.raises(InputError, match="inside the folder to sign"):
        sign_folder(run / "adapter", run / "adapter" / "key.pem")


def test_signature_inside_the_folder_is_ignored_like_model_signing(run_copy, tmp_path):
    run, _ = run_copy
    private, public = generate_keypair(tmp_path / "k")
    result = sign_folder(run / "adapter", private, sig_path=run / "adapter" / "model.sig")
    statement = payload_of(run / "adapter" / "model.sig")
    assert "model.sig" in statement["predicate"]["serialization"]["ignore_paths"]
    assert "model.sig" not in [r["name"] for r in statement["predicate"]["resources"]]
    report = verify_folder(run / "adapter", public, sig_path=run / "adapter" / "model.sig")
    assert report["subject_digest"] == result["subject_digest"]


def test_known_digests_sign_what_a_fresh_hash_signs_and_verify_still_rehashes(run_copy, tmp_path):
    """`known` digests (the merge's, taken as it wrote each byte) spare reading those files again: the statement is
    the one a fresh hash gives. A wrong one is not trusted: verify re-hashes every file and names the one that
    differs."""
    from mistral_sov.errors import InputError, VerificationError

    run, _ = run_copy
    folder, weights = run / "adapter", "adapter_model.safetensors"
    private, public = generate_keypair(tmp_path / "k")
    fresh = sign_folder(folder, private, sig_path=tmp_path / "fresh.sig")
    known = sign_folder(folder, private, sig_path=tmp_path / "known.sig",
                        known={weights: sha256_file(folder / weights), "not/in/the/folder": "0" * 64})
    assert payload_of(tmp_path / "known.sig") == payload_of(tmp_path / "fresh.sig")
    assert known == {**fresh, "sig": str(tmp_path / "known.sig")}
    reports = [verify_folder(folder, public, sig_path=tmp_path / name) for name in ("fresh.sig", "known.sig")]
    assert [{k: v for k, v in r.items() if k != "sig"} for r in reports] == \
        [{k: v for k, v in reports[0].items() if k != "sig"}] * 2

    sign_folder(folder, private, sig_path=tmp_path / "wrong.sig", known={weights: "0" * 64})
    with pytest.raises(VerificationError, match=f"changed: {weights} \\(sha256 000000000000"):
        verify_folder(folder, public, sig_path=tmp_path / "wrong.sig")
    with pytest.raises(InputError, match="not a lowercase hex sha256"):
        sign_folder(folder, private, sig_path=tmp_path / "bad.sig", known={weights: "ABC"})
    assert not (tmp_path / "bad.sig").exists()


# -- hashing --------------------------------------------------------------------------------------------------------

def test_streamed_parallel_hashing_matches_hashlib(tmp_path):
    sizes = [0, 1, (1 << 20) - 1, (1 << 20) + 7, 3 * (1 << 20) + 5]
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    assert hash_files(paths, workers=3) == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_help_imports_no_cryptography():
    code = ("import sys\nfrom mistral_sov.cli import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'cryptography' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "verify" in done.stdout and "keygen" in done.stdout


# -- the independent reference verifier (dev extra: model_signing, with pyopenssl pinned beside it) ----------------

def _no_network_prefix() -> list[str]:
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []  # still offline in practice: the key method never touches the network


def _model_signing(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*_no_network_prefix(), sys.executable, "-m", "model_signing", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_model_signing_accepts_msov_signatures_offline(run_copy, tmp_path, curve):
    pytest.importorskip("model_signing")
    run, _ = run_copy
    private, public = generate_keypair(tmp_path / "k", curve=curve)
    sign_folder(run / "adapter", private, sig_path=tmp_path / "adapter.sig")
    done = _model_signing("verify", "key", run / "adapter", "--signature", tmp_path / "adapter.sig",
                          "--public_key", public)
    assert done.returncode == 0 and "Verification succeeded" in done.stdout, done.stdout + done.stderr
    (run / "adapter" / "adapter_config.json").write_text("{}")  # and it really checks the files
    done = _model_signing("verify", "key", run / "adapter", "--signature", tmp_path / "adapter.sig",
                          "--public_key", public)
    assert done.returncode != 0


def test_msov_verifies_model_signing_signatures(run_copy, tmp_path):
    pytest.importorskip("model_signing")
    run, _ = run_copy
    private, public = generate_keypair(tmp_path / "k")
    done = _model_signing("sign", "key", run / "adapter", "--private_key", private,
                          "--signature", run / "adapter" / "model.sig")
    assert done.returncode == 0, done.stderr
    report = verify_folder(run / "adapter", public, sig_path=run / "adapter" / "model.sig")
    unsigned = describe_folder(run / "adapter", ignore=[*DEFAULT_IGNORE, "model.sig"])
    assert report["subject_digest"] == unsigned["subject_digest"]
    assert [f["name"] for f in report["files"]] == [f["name"] for f in unsigned["files"]]
