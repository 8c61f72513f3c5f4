"""ORPO: the loss against TRL's ORPOTrainer (recorded by bench/record_trl_orpo.py), and training on a tiny model."""

from __future__ import annotations

import json

import pytest
from test_preference import RERECORD, TRL, msov_rows, preference_rows, trl_model, write_jsonl  # noqa: F401

ODDS_RATIO_METRICS = ("log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected")


def orpo_on_trls_batch(model, setting: str):
    import torch

    from mistral_sov.train.preference import PairCollator, odds_ratio_loss, sequence_logps

    record = json.loads((TRL / "trl_orpo.json").read_text())["settings"][setting]
    rows = json.loads((TRL / "trl_dpo.json").read_text())["rows"]
    if record["one_token_prompt"]:
        rows = [{**row, "prompt_ids": row["prompt_ids"][:1]} for row in rows]
    batch = PairCollator(pad_token_id=3)(msov_rows(rows))
    with torch.no_grad():
        logps, tokens = sequence_logps(model, batch)
    result = odds_ratio_loss(*logps.chunk(2), *tokens.chunk(2), beta=record["beta"])
    pc, pr = (logps / tokens).chunk(2)
    ours = {"loss": result.loss.item(), "nll_loss": result.nll.item(),
            "log_odds_ratio": result.log_sigmoid.mean().item(), "log_odds_chosen": result.log_odds.mean().item(),
            "rewards/chosen": result.chosen_rewards.mean().item(),
            "rewards/rejected": result.rejected_rewards.mean().item(), "rewards/margins": result.margins.mean().item(),
            "rewards/accuracies": result.accuracies.mean().item(), "logps/chosen": pc.mean().item(),
            "logps/rejected": pr.mean().item()}
    return ours, record, result, rows


@pytest.mark.parametrize("setting", ["orpo", "orpo_beta_0.5"])
def test_orpo_odds_ratio_term_and_metrics_equal_trls(trl_model, setting):  # noqa: F811 - the shared fixture
    """The odds-ratio term (loss − NLL) and every logged metric but the NLL equal TRL's; TRL's NLL counts the prompt
    tokens too, msov's the answer tokens only."""
    ours, trl, _, _ = orpo_on_trls_batch(trl_model, setting)
    for key in ODDS_RATIO_METRICS:
        assert ours[key] == pytest.approx(trl[key], abs=1e-5), f"{setting} {key} differs from TRL's; {RERECORD}"
    assert ours["loss"] - ours["nll_loss"] == pytest.approx(trl["loss"] - trl["nll_loss"], abs=1e-5)
    assert abs(ours["nll_loss"] - trl["nll_loss"]) > 1e-3  # the masking differs here, on purpose


def test_orpo_whole_loss_equals_trls_where_the_prompt_is_one_token(trl_model):  # noqa: F811
    """With one-token prompts no prompt token is ever predicted, so TRL's whole-sequence NLL and msov's answer-only
    NLL count the same tokens: the whole loss is TRL's."""
    ours, trl, _, _ = orpo_on_trls_batch(trl_model, "orpo_one_token_prompt")
    for key in ("loss", "nll_loss", *ODDS_RATIO_METRICS):
        assert ours[key] == pytest.approx(trl[key], abs=1e-5), f"{key} differs from TRL's; {RERECORD}"


def test_trls_nll_is_msovs_with_the_prompt_supervised(trl_model):  # noqa: F811
    """The one difference, shown: msov's NLL over the chosen rows with the prompt tokens labelled too is TRL's."""
    import torch

    from mistral_sov.train.preference import PairCollator, sequence_logps

    trl = json.loads((TRL / "trl_orpo.json").read_text())["settings"]["orpo"]
    rows = json.loads((TRL / "trl_dpo.json").read_text())["rows"]
    chosen = [{"input_ids": r["prompt_ids"] + r["chosen_ids"]} for r in rows]
    batch = PairCollator(pad_token_id=3)([{"chosen_input_ids": c["input_ids"], "chosen_labels": c["input_ids"],
                                           "rejected_input_ids": c["input_ids"], "rejected_labels": c["input_ids"]}
                                          for c in chosen])
    with torch.no_grad():
        logps, tokens = sequence_logps(trl_model, batch)
    nll = -(logps.chunk(2)[0].sum() / tokens.chunk(2)[0].sum()).item()
    assert nll == pytest.approx(trl["nll_loss"], abs=1e-5)


def test_log1mexp_is_stable_at_both_ends():
    import torch

    from mistral_sov.train.preference import log1mexp

    x = torch.tensor([-1e-7, -0.5, -0.7, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-9, -100.0]))).all()


@pytest.fixture(scope="module")
def orpo_run(tiny_model, tmp_path_factory):
    import yaml
    from conftest import small_recipe

    from mistral_sov.recipe import load_recipe
    from mistral_sov.train.pipeline import finetune

    root = tmp_path_factory.mktemp("orpo")
    data = small_recipe(tiny_model, root / "out", epochs=3, method="orpo", beta=0.5, eval_steps=6)
    data["data"] = {"train": str(write_jsonl(root / "train.jsonl", preference_rows(64, 1))),
                    "eval": str(write_jsonl(root / "eval.jsonl", preference_rows(32, 2)))}
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    return finetune(load_recipe(root / "r.yaml")), root


def test_orpo_learns_the_preferred_pattern_on_held_out_pairs(orpo_run):
    record, root = orpo_run
    before, after = record.eval.before, record.eval.after
    assert 0.2 <= before.reward_accuracy <= 0.8, before  # no reference: the base's own preference, a coin toss
    assert after.reward_accuracy > 0.9 and after.reward_margin > before.reward_margin, after
    assert after.loss < before.loss and record.train.final_loss < record.train.first_loss
    assert after.perplexity is None


def test_orpo_logs_trls_metrics_and_names_its_method(orpo_run):
    import yaml

    record, root = orpo_run
    lines = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(steps[-1])
    assert steps[-1]["nll_loss"] < steps[0]["nll_loss"]
    evals = [line for line in lines if "eval_loss" in line]
    assert evals and {"eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss"} <= set(evals[-1])
    recipe = yaml.safe_load((root / "out" / "recipe.yaml").read_text())
    assert recipe["train"]["method"] == "orpo" and recipe["train"]["beta"] == 0.5
    provenance = json.loads((root / "out" / "adapter" / "msov" / "provenance.json").read_text())
    assert provenance["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["train"]["method"] == "orpo"


def test_orpo_model_card_names_the_method_and_the_pairs(orpo_run, tmp_path):
    from mistral_sov.export.adapter import export_adapter

    record, root = orpo_run
    export_adapter(root / "out", out=tmp_path / "card")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "| training method | ORPO (beta 0.5; no reference model) |" in card
    assert f"| preference data | `sha256:{record.data.eval[0].sha256}` (32 pairs, held out) |" in card
    assert "started from" not in card
