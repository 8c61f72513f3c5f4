"""Evidence in the run record and the provenance: the training compute actually spent (and its share of the base
model's pre-training compute), the controls that ran (egress guard counters, offline environment, scan policy,
seed), and `msov reproduce`'s outcome written beside the signed folder."""

import importlib.util
import json
import socket

import pytest
import yaml
from conftest import REPO, small_recipe

from mistral_sov.guard.egress import EgressRefused
from mistral_sov.model.compute import (
    THRESHOLD,
    ModelShape,
    causal_pairs,
    training_flops,
)
from mistral_sov.record import RunRecord


@pytest.fixture(scope="module")
def signed_run(tiny_model, tmp_path_factory):
    """One real two-step fine-tune through the CLI (so under its egress guard), signed: run folder and public key."""
    from typer.testing import CliRunner

    from mistral_sov.cli import app

    root = tmp_path_factory.mktemp("evidence")
    invoke = lambda *args: CliRunner().invoke(app, [str(a) for a in args])
    assert invoke("keygen", "--out", root / "keys" / "signer").exit_code == 0
    data = small_recipe(tiny_model, root / "out", max_steps=2)
    data["model"]["base_training_flops"] = "2.5e24"  # as YAML 1.1 reads it (a string): the recipe takes it
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    done = invoke("finetune", recipe, "--sign-key", root / "keys" / "signer.pem", "--json")
    assert done.exit_code == 0, done.output
    return root / "out", root / "keys" / "signer.pub"


def test_compute_is_recorded_and_is_the_formula_over_the_recorded_counts(signed_run, tiny_model):
    out, _ = signed_run
    record = RunRecord.read(out / "run.json")
    compute = record.compute
    assert compute.flops > 0 and compute.tokens_processed == record.train.tokens_seen > 0
    assert (compute.total_parameters, compute.trainable_parameters) == (record.parameters.total,
                                                                         record.parameters.trainable)
    # the model's shape, counted here from config.json by hand (Mistral: q, k, v, o, gate, up, down)
    config = json.loads((tiny_model / "config.json").read_text())
    d, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    assert compute.frozen_matmul_parameters == layers * (2 * d * q + 2 * d * kv + 3 * d * inter)
    assert compute.lm_head_parameters == d * config["vocab_size"] and compute.attention_width == layers * q
    expected = (4 * compute.frozen_matmul_parameters * compute.tokens_processed
                + 6 * compute.trainable_parameters * compute.tokens_processed
                + 4 * compute.lm_head_parameters * compute.supervised_tokens
                + 12 * compute.attention_width * compute.attention_pairs)
    assert compute.flops == pytest.approx(expected, rel=1e-12)
    assert 0 < compute.supervised_tokens < compute.tokens_processed and compute.attention_pairs > 0
    assert "4·N_frozen·T + 6·N_trainable·T" in compute.formula
    assert compute.base_training_flops == 2.5e24 and compute.ratio == pytest.approx(compute.flops / 2.5e24)
    assert compute.above_threshold is False and compute.threshold == pytest.approx(1 / 3)


def test_controls_that_ran_are_recorded(signed_run):
    out, _ = signed_run
    record = RunRecord.read(out / "run.json")
    controls = record.controls
    assert controls.egress_guard.active is True
    assert controls.egress_guard.refused == 0 and controls.egress_guard.refused_destinations == []
    assert controls.offline_env["HF_HUB_OFFLINE"] == "1" and controls.offline_env["TRANSFORMERS_OFFLINE"] == "1"
    assert controls.seed == record.seed == 7
    assert controls.scan.action == "warn" and controls.scan.fail_on == [] and controls.scan.redact is False
    assert controls.scan.counts == record.data.scan.counts and controls.scan.rows == record.data.scan.rows > 0


def test_provenance_carries_compute_and_controls_and_verify_explains_them(signed_run, cli):
    out, public = signed_run
    record = RunRecord.read(out / "run.json")
    statement = json.loads((out / "adapter" / "msov" / "provenance.json").read_text())
    byproducts = {b["name"]: b["annotations"] for b in statement["predicate"]["runDetails"]["byproducts"]}
    assert byproducts["compute"] == record.compute.model_dump(mode="json")
    assert byproducts["controls"] == record.controls.model_dump(mode="json")

    as_json = cli("verify", out / "adapter", "--key", public, "--json")
    assert as_json.exit_code == 0, as_json.output
    facts = json.loads(as_json.stdout)["provenance"]
    assert facts["compute"]["flops"] == record.compute.flops and facts["controls"]["seed"] == 7
    screen = cli("verify", out / "adapter", "--key", public, "--explain")
    assert screen.exit_code == 0, screen.output
    compute_line = next(line for line in screen.stdout.splitlines() if line.startswith("compute"))
    assert "FLOPs" in compute_line and "2.5e+24" in compute_line and "below the 1/3 threshold" in compute_line
    controls_line = next(line for line in screen.stdout.splitlines() if line.startswith("controls"))
    assert "refused 0" in controls_line and "HF_HUB_OFFLINE=1" in controls_line and "fail-on none" in controls_line


def test_provenance_without_the_evidence_explains_as_none():
    from mistral_sov.trust.provenance import build_statement, explain

    facts = explain(build_statement(None, None, {"adapter_model.safetensors": "0" * 64}))
    assert facts["compute"] is None and facts["controls"] is None
    # a run.json written before the evidence existed still reads (both parts are optional)
    doc = json.loads(json.dumps(_minimal_record()))
    assert RunRecord.from_json(doc).compute is None


def _minimal_record() -> dict:
    stats = {"rows_in": 1, "rows_out": 1, "truncated": 0, "dropped_overlong": 0, "dropped_unsupervised": 0,
             "tokens": 10, "supervised_tokens": 5, "min_len": 10, "median_len": 10.0, "max_len": 10}
    return {"name": "old", "run_dir": "/r", "adapter_dir": "/r/adapter", "recipe_digest": "x", "seed": 1,
            "base_model": {"path": "/m"}, "data": {}, "tokens": {"train": stats},
            "parameters": {"trainable": 1, "total": 2}, "train": {"steps": 1}, "started_at": "t",
            "finished_at": "t", "wall_time_s": 1.0, "adapter_digest": "d"}


@pytest.mark.parametrize("value", ["-1", "abc", "0", "inf"])
def test_a_bad_base_training_flops_flag_is_a_usage_error(tiny_model, tmp_path, write_recipe, cli, value):
    result = cli("finetune", write_recipe(small_recipe(tiny_model, tmp_path / "out")),
                 f"--base-training-flops={value}")
    assert result.exit_code == 2
    assert "--base-training-flops" in result.stderr and "positive number of FLOPs" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [-1, "abc"])
def test_a_bad_base_training_flops_in_the_recipe_is_exit_3(tiny_model, tmp_path, write_recipe, cli, value):
    data = small_recipe(tiny_model, tmp_path / "out")
    data["model"]["base_training_flops"] = value
    result = cli("finetune", write_recipe(data), "--dry-run")
    assert result.exit_code == 3
    assert "model.base_training_flops" in result.stderr


def test_the_flag_wins_and_refused_connections_are_counted_and_named(tiny_model, tmp_path, write_recipe, cli,
                                                                     monkeypatch):
    """One run for two things. --base-training-flops overrides the recipe's figure (1e9 FLOPs, of which two steps
    are more than a third). And code that phones home during the run, swallowing the refusal as telemetry does:
    the run completes, and its record says what the guard refused."""
    from mistral_sov.train import pipeline

    original = pipeline.sample_conversation

    def phoning_home(files):
        for port in (443, 80):
            try:
                socket.create_connection(("192.0.2.1", port), timeout=1)
            except EgressRefused:
                pass
        return original(files)

    monkeypatch.setattr(pipeline, "sample_conversation", phoning_home)
    data = small_recipe(tiny_model, tmp_path / "out", max_steps=2)
    data["model"]["base_training_flops"] = 2.5e24
    result = cli("finetune", write_recipe(data), "--base-training-flops", "1e9", "--json")
    assert result.exit_code == 0, result.output
    record = RunRecord.read(tmp_path / "out" / "run.json")
    compute, egress = record.compute, record.controls.egress_guard
    assert compute.base_training_flops == 1e9 and compute.ratio == pytest.approx(compute.flops / 1e9)
    assert compute.ratio > THRESHOLD and compute.above_threshold is True
    assert egress.active and egress.refused == 2
    assert egress.refused_destinations == ["192.0.2.1:443", "192.0.2.1:80"]


def test_finetune_outside_the_guard_records_it_inactive(tiny_model, tmp_path, write_recipe):
    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    record = finetune(load_recipe(write_recipe(small_recipe(tiny_model, tmp_path / "out", max_steps=1))))
    assert record.controls.egress_guard.active is False
    assert record.compute.base_training_flops is None and record.compute.ratio is None
    assert record.compute.above_threshold is None


def test_reproduce_writes_its_outcome_beside_the_folder_which_still_verifies(signed_run, cli):
    out, public = signed_run
    adapter = out / "adapter"
    before = sorted(p.relative_to(adapter) for p in adapter.rglob("*"))
    result = cli("reproduce", adapter, "--key", public, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    written = out / "adapter.reproduced.json"
    assert report["result_file"] == str(written)
    outcome = json.loads(written.read_text())
    assert outcome["status"] == "reproduced" and outcome["match"] == "identical"
    assert outcome["expected_digest"] == outcome["got_digest"] and len(outcome["expected_digest"]) == 64
    assert outcome["checked_at"] and outcome["msov_version"]
    assert sorted(p.relative_to(adapter) for p in adapter.rglob("*")) == before
    assert not list(out.glob("*.tmp-*"))
    assert cli("verify", adapter, "--key", public).exit_code == 0


def test_a_differing_reproduction_is_recorded_as_differs(tmp_path):
    from mistral_sov.reproduce import write_result

    folder = tmp_path / "adapter"
    folder.mkdir()
    path = write_result(folder, {"status": "differs", "recorded": {"a.safetensors": "1" * 64},
                                 "reproduced": {"a.safetensors": "2" * 64}, "version_changes": {},
                                 "eval_loss": {"recorded": 1.0, "reproduced": 2.0}, "reasons": []})
    outcome = json.loads(path.read_text())
    assert path == tmp_path / "adapter.reproduced.json" and list(folder.iterdir()) == []
    assert outcome["status"] == "differs" and outcome["expected_digest"] != outcome["got_digest"]


def test_the_bench_counts_flops_with_the_same_function():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "bench" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 160, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000}
    rows = [(10, 4), (33, 20)]

    class Config:
        def __init__(self, values):
            self.__dict__.update(values)

    shape = ModelShape.from_config(config)
    assert bench.model_flops(Config(config), 512, rows) == training_flops(
        shape, trainable=512, tokens=43, supervised=24, attention_pairs=causal_pairs(10) + causal_pairs(33))
    # the count the bench made before it moved into the library, by hand
    body = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160)
    by_hand = sum(n * (4 * body + 6 * 512) + s * 4 * 64 * 1000 + 2 * 12 * 64 * n * (n + 1) / 2 for n, s in rows)
    assert bench.model_flops(Config(config), 512, rows) == pytest.approx(by_hand, rel=1e-12)
