"""DPO: the loss against TRL's recorded values, preference data to token pairs, training on a learnable preference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TRL = Path(__file__).resolve().parent / "trl_dpo"
RERECORD = ("re-record with bench/record_trl_dpo.py (its docstring says how: a separate venv with TRL, never a "
            "dependency of msov)")


@pytest.fixture(scope="module")
def trl_model():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TRL / "base", dtype="float32")
    model = PeftModel.from_pretrained(base, TRL / "adapter")
    model.eval()
    return model


def msov_rows(recorded: list[dict]) -> list[dict]:
    """TRL's prompt/chosen/rejected ids as msov's pair rows: the prompt's labels -100, the answer's its ids."""
    rows = []
    for row in recorded:
        prompt = row["prompt_ids"]
        rows.append({f"{side}_input_ids": prompt + row[f"{side}_ids"] for side in ("chosen", "rejected")}
                    | {f"{side}_labels": [-100] * len(prompt) + row[f"{side}_ids"] for side in ("chosen", "rejected")})
    return rows


@pytest.mark.parametrize("setting", ["sigmoid", "sigmoid_beta_0.5", "ipo", "sigmoid_smoothed"])
def test_dpo_loss_and_rewards_equal_trls(trl_model, setting):
    import torch

    from mistral_sov.train.preference import PairCollator, pair_logps, preference_loss

    record = json.loads((TRL / "trl_dpo.json").read_text())
    expected = record["settings"][setting]
    batch = PairCollator(pad_token_id=3)(msov_rows(record["rows"]))
    with torch.no_grad():
        pc, pr, rc, rr, nc, nr = pair_logps(trl_model, batch)
    loss_type = "ipo" if expected["trl_loss_type"] == "ipo" else "sigmoid"
    result = preference_loss(pc, pr, rc, rr, beta=expected["beta"], loss_type=loss_type,
                             label_smoothing=expected["label_smoothing"], chosen_tokens=nc, rejected_tokens=nr)
    if expected["pair_by_pair"]:  # recorded one pair at a time: compare pair by pair
        ours = {"loss": result.losses, "rewards_chosen": result.chosen_rewards,
                "rewards_rejected": result.rejected_rewards, "margins": result.margins,
                "accuracy": result.accuracies, "logps_chosen": pc, "logps_rejected": pr}
        ours = {key: value.tolist() for key, value in ours.items()}
    else:
        ours = {"loss": [result.loss.item()], "rewards_chosen": [result.chosen_rewards.mean().item()],
                "rewards_rejected": [result.rejected_rewards.mean().item()], "margins": [result.margins.mean().item()],
                "accuracy": [result.accuracies.mean().item()], "logps_chosen": [pc.mean().item()],
                "logps_rejected": [pr.mean().item()]}
    for key, values in ours.items():
        assert values == pytest.approx(expected[key], abs=1e-5), f"{setting} {key} differs from TRL's; {RERECORD}"
    # the fixed batch is not a degenerate one: the policy differs from the reference, pairs disagree
    assert abs(result.margins).min() > 1e-3


def test_reference_is_the_base_with_the_adapter_off(trl_model):
    """The reference log-probs are those of the base model itself, loaded alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_sov.train.preference import PairCollator, reference_model, sequence_logps

    record = json.loads((TRL / "trl_dpo.json").read_text())
    batch = PairCollator(pad_token_id=3)(msov_rows(record["rows"]))
    base = AutoModelForCausalLM.from_pretrained(TRL / "base", dtype="float32").eval()
    with torch.no_grad():
        alone, _ = sequence_logps(base, batch)
        policy, _ = sequence_logps(trl_model, batch)
    with reference_model(trl_model):
        reference, counts = sequence_logps(trl_model, batch)
    assert torch.equal(reference, alone)
    assert not torch.allclose(policy, reference)
    assert counts.tolist() == [3, 5, 7, 6, 2, 4]  # answer tokens: chosen rows first, then rejected


def test_preference_loss_refuses_unknown_losses_and_ipo_without_lengths():
    import torch

    from mistral_sov.train.preference import preference_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="chosen_tokens"):
        preference_loss(x, x, x, x, loss_type="ipo")
    # equal policy and reference: zero rewards, loss log 2 (sigmoid) and 1/(2·beta)² (ipo)
    assert preference_loss(x, x, x, x, beta=0.1).loss.item() == pytest.approx(0.693147, abs=1e-6)
    assert preference_loss(x, x, x, x, beta=0.1, loss_type="ipo", chosen_tokens=x + 3,
                           rejected_tokens=x + 2).loss.item() == pytest.approx(25.0)
