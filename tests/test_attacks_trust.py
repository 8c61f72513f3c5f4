"""Issue 12 as an attacker tries it: secrets shipped in exports, signatures that destroy files, hostile names,
hostile bundles and readable keys. Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    from mistral_sov.trust.keys import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "signer")


def _adapter(folder: Path) -> Path:
    """A bare adapter folder: what load_run accepts, enough for the refusals that come before any work."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(256))
    return folder


def test_export_refuses_a_symlink_in_the_run(cli, keypair, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:secret\n")
    run = _adapter(tmp_path / "run")
    (run / "extra.txt").symlink_to(secret)
    result = cli("export", run, "--adapter", "--out", tmp_path / "out", "--key", keypair[0], "--json")
    assert result.exit_code == 3, result.output
    assert "extra.txt" in json.loads(result.stdout)["error"] and "symbolic link" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("armour", ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY",
                                    "OPENSSH PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
def test_export_and_sign_refuse_any_private_key(cli, keypair, tmp_path, armour):
    run = _adapter(tmp_path / "run")
    (run / "notes.txt").write_text(f"hello\n-----BEGIN {armour}-----\nAAAA\n-----END {armour}-----\n")
    result = cli("export", run, "--adapter", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 3 and "notes.txt" in result.stdout and "private key" in result.stdout
    signed = cli("sign", run, "--key", keypair[0], "--json")
    assert signed.exit_code == 3 and "notes.txt" in signed.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "run.sig").exists()


def test_a_copy_or_hard_link_of_the_key_is_refused(cli, keypair, tmp_path):
    run = _adapter(tmp_path / "run")
    (run / "harmless.bin").write_bytes(keypair[0].read_bytes()[::-1])  # same size, other bytes: not refused
    os.link(keypair[0], run / "weights.bin")
    result = cli("sign", run, "--key", keypair[0], "--json")
    assert result.exit_code == 3 and "weights.bin" in result.stdout and "copy of the signing key" in result.stdout


def test_a_der_private_key_is_refused(cli, keypair, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    run = _adapter(tmp_path / "run")
    der = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (run / "blob.dat").write_bytes(der)
    result = cli("sign", run, "--key", keypair[0], "--json")
    assert result.exit_code == 3 and "blob.dat" in result.stdout


def test_sign_out_never_destroys_a_file(cli, keypair, tmp_path):
    run = _adapter(tmp_path / "run")
    key_before = keypair[0].read_bytes()
    for out, words in [(keypair[0], "private key itself"), (run / "a.txt", "inside the folder"),
                       (run / "adapter_config.json", "inside the folder"), (tmp_path / "notes.txt", "not a signature")]:
        if out.name == "notes.txt":
            out.write_text("precious")
        result = cli("sign", run, "--key", keypair[0], "--out", out, "--json")
        assert result.exit_code == 3 and words in result.stdout, (out, result.stdout)
    assert keypair[0].read_bytes() == key_before and (tmp_path / "notes.txt").read_text() == "precious"
    assert not (run / "a.txt").exists()
    first = cli("sign", run, "--key", keypair[0], "--out", tmp_path / "x.sig", "--json")
    again = cli("sign", run, "--key", keypair[0], "--out", tmp_path / "x.sig", "--json")  # an earlier signature
    assert first.exit_code == 0 and again.exit_code == 0, again.stdout


def test_hostile_names_are_escaped_and_backslashes_refused_at_sign_time(cli, keypair, tmp_path):
    run = _adapter(tmp_path / "run")
    (run / "a\nsha256  fake.txt").write_text("x")
    (run / "b\x1b[2Jc.txt").write_text("y")
    shown = cli("manifest", "show", run)
    assert shown.exit_code == 0 and "a\\nsha256  fake.txt" in shown.stdout and "\\x1b[2J" in shown.stdout
    assert "\x1b[2J" not in shown.stdout and "\nsha256  fake" not in shown.stdout
    assert cli("sign", run, "--key", keypair[0]).exit_code == 0
    (run / "b\x1b[2Jc.txt").write_text("changed")
    failed = cli("verify", run, "--key", keypair[1])
    assert failed.exit_code == 4 and "b\\x1b[2Jc.txt" in failed.output and "\x1b[2J" not in failed.output
    (run / "we\\ird.txt").write_text("z")
    refused = cli("sign", run, "--key", keypair[0], "--out", tmp_path / "w.sig", "--json")
    assert refused.exit_code == 3 and "we\\\\ird.txt" in json.loads(refused.stdout)["error"]


def test_a_deeply_nested_sig_is_a_verification_failure(cli, keypair, tmp_path):
    run = _adapter(tmp_path / "run")
    assert cli("sign", run, "--key", keypair[0]).exit_code == 0
    (tmp_path / "run.sig").write_text("[" * 100_000 + "]" * 100_000)
    result = cli("verify", run, "--key", keypair[1], "--json")
    assert result.exit_code == 4 and "nested too deeply" in result.stdout


def test_a_key_others_can_read_is_refused(cli, keypair, tmp_path, monkeypatch):
    run = _adapter(tmp_path / "run")
    open_key = tmp_path / "open.pem"
    shutil.copy(keypair[0], open_key)
    open_key.chmod(0o644)
    result = cli("sign", run, "--key", open_key, "--json")
    assert result.exit_code == 3 and "readable by other users" in result.stdout and "0644" in result.stdout
    monkeypatch.setenv("MSOV_ALLOW_OPEN_KEY", "1")
    assert cli("sign", run, "--key", open_key, "--json").exit_code == 0


def test_registry_list_verifies_each_entry_against_its_signed_name_and_version(cli, keypair, tmp_path):
    run, reg = _adapter(tmp_path / "run"), tmp_path / "reg"
    for version in ("1.0.0", "1.1.0"):
        (run / "adapter_model.safetensors").write_bytes(os.urandom(256))
        assert cli("export", run, "--adapter", "--registry", reg, "--version", version, "--name", "helpdesk",
                   "--key", keypair[0], "--json").exit_code == 0
    good = cli("registry", "list", reg, "--pub", keypair[1], "--json")
    assert good.exit_code == 0 and {e["status"] for e in json.loads(good.stdout)["adapters"]} == {"verified"}
    shutil.copytree(reg / "helpdesk" / "1.0.0", reg / "helpdesk" / "9.9.9")  # cp -r 1.0.0 9.9.9
    shutil.copytree(reg / "helpdesk" / "1.1.0", reg / "other" / "1.1.0")
    (reg / "helpdesk" / "1.1.0" / "README.md").write_text("tampered")
    listed = cli("registry", "list", reg, "--pub", keypair[1], "--json")
    assert listed.exit_code == 4
    status = {(e["name"], e["version"]): e["status"] for e in json.loads(listed.stdout)["adapters"]}
    assert status[("helpdesk", "1.0.0")] == "verified"
    assert status[("helpdesk", "9.9.9")].startswith("FAILED: signed as helpdesk 1.0.0, listed as helpdesk 9.9.9")
    assert status[("other", "1.1.0")].startswith("FAILED: signed as helpdesk 1.1.0")
    assert status[("helpdesk", "1.1.0")].startswith(("FAILED", "MODIFIED"))
    text = cli("registry", "list", reg, "--pub", keypair[1])
    assert text.exit_code == 4 and "9.9.9" in text.stdout and "verified" in text.stdout
