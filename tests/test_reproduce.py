"""`msov reproduce`: a signed tiny run re-trains to byte-identical weights on CPU; changed inputs are refused."""

import json

import yaml
from conftest import small_recipe


def test_reproduce_identical_then_refuses_changed_data(tiny_model, tmp_path, cli):
    import shutil

    from conftest import SAMPLES

    data = tmp_path / "train.jsonl"
    shutil.copy(SAMPLES / "helpdesk_chat.jsonl", data)
    recipe = small_recipe(tiny_model, tmp_path / "run", max_steps=6)
    recipe["data"]["train"] = [{"path": str(data), "format": "chat"}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli("keygen", "--out", tmp_path / "keys" / "signer").exit_code == 0
    trained = cli("finetune", tmp_path / "r.yaml", "--sign-key", tmp_path / "keys" / "signer.pem", "--json")
    assert trained.exit_code == 0, trained.output
    adapter, pub = tmp_path / "run" / "adapter", tmp_path / "keys" / "signer.pub"

    result = cli("reproduce", adapter, "--key", pub, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "identical" and report["reproduced"] == report["recorded"]

    with data.open("a") as handle:  # one more row: not the data the adapter was trained on
        handle.write(data.read_text().splitlines()[0] + "\n")
    refused = cli("reproduce", adapter, "--key", pub)
    assert refused.exit_code == 4
    assert f"{data}: sha256 differs" in refused.stderr
