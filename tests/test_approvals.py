"""Separation of duties: the trainer signs, another party approves, and `msov verify --require` passes only when
every required party vouched for the very same files. Each approval is an ordinary OMS bundle: the reference
verifier (`model_signing`) accepts it on its own."""

import json
import subprocess
import sys

import pytest
from test_certificates import Pki

from mistral_sov.trust.keys import generate_keypair


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def signed(cli, tmp_path):
    """A folder the trainer signed with a key pair; its neighbour signature FOLDER.sig."""
    folder = tmp_path / "adapter"
    (folder / "msov").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}\n')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    trainer = generate_keypair(tmp_path / "trainer")
    assert cli("sign", folder, "--key", trainer[0]).exit_code == 0
    return folder, trainer


def test_approve_then_require_both_parties(cli, signed, pki, tmp_path):
    folder, (trainer_key, trainer_pub) = signed
    approved = cli("approve", folder, "--key", pki.key, "--cert", pki.leaf_crt, "--chain", pki.int_crt,
                   "--signed-by", trainer_pub, "--json")
    assert approved.exit_code == 0, approved.output
    answer = json.loads(approved.stdout)
    approval = tmp_path / answer["approval"].rsplit("/", 1)[-1]
    assert approval.name.startswith("adapter.approval-") and approval.is_file()
    assert answer["approver"]["subject"] .startswith("CN=ML Release Signer")

    both = cli("verify", folder, "--require", trainer_pub, "--require", pki.leaf_crt, "--ca", pki.root_crt, "--json")
    assert both.exit_code == 0, both.output
    parties = json.loads(both.stdout)["parties"]
    assert [p["role"] for p in parties] == ["signer", "approver"]
    assert parties[1]["subject"].startswith("CN=ML Release Signer") and parties[0]["method"] == "key"

    # a party that did not sign or approve
    _, stranger = generate_keypair(tmp_path / "stranger")
    missing = cli("verify", folder, "--require", trainer_pub, "--require", stranger, "--json")
    assert missing.exit_code == 4 and "no signature or approval by" in json.loads(missing.stdout)["error"]

    # the approval is an ordinary OMS certificate bundle: the reference verifier checks it on its own
    pytest.importorskip("model_signing")
    done = subprocess.run([sys.executable, "-m", "model_signing", "verify", "certificate", str(folder),
                           "--signature", str(approval), "--certificate_chain", str(pki.root_crt),
                           "--certificate_chain", str(pki.int_crt)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_approval_is_given_only_after_the_signature_checks(cli, signed, tmp_path):
    folder, (trainer_key, trainer_pub) = signed
    approver_key, approver_pub = generate_keypair(tmp_path / "approver")
    unchecked = cli("approve", folder, "--key", approver_key, "--json")
    assert unchecked.exit_code == 3 and "--signed-by" in json.loads(unchecked.stdout)["error"]
    own = cli("approve", folder, "--key", trainer_key, "--signed-by", trainer_pub, "--json")
    assert own.exit_code == 3 and "another party" in json.loads(own.stdout)["error"]

    (folder / "adapter_config.json").write_text('{"r": 16}\n')  # changed after the trainer signed
    changed = cli("approve", folder, "--key", approver_key, "--signed-by", trainer_pub, "--json")
    assert changed.exit_code == 4 and not list(tmp_path.glob("adapter.approval-*.sig"))


def test_require_fails_when_the_parties_did_not_sign_the_same_files(cli, signed, tmp_path):
    folder, (trainer_key, trainer_pub) = signed
    approver_key, approver_pub = generate_keypair(tmp_path / "approver")
    assert cli("approve", folder, "--key", approver_key, "--signed-by", trainer_pub).exit_code == 0
    assert cli("verify", folder, "--require", trainer_pub, "--require", approver_pub).exit_code == 0

    (folder / "extra.txt").write_text("added after the approval\n")  # the trainer re-signs; the approver did not
    assert cli("sign", folder, "--key", trainer_key).exit_code == 0
    both = cli("verify", folder, "--require", trainer_pub, "--require", approver_pub, "--json")
    assert both.exit_code == 4 and "extra.txt" in json.loads(both.stdout)["error"]
    alone = cli("verify", folder, "--require", trainer_pub, "--json")  # the trainer's own signature still holds
    assert alone.exit_code == 0
