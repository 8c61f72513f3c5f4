"""Record TRL's ORPO loss and metrics on the fixed tiny model and batch of tests/trl_dpo/, for tests/test_orpo.py.

Run it as bench/record_trl_dpo.py is run (its docstring: a separate venv with TRL 1.16.0 and msov's own torch,
transformers and peft; TRL is never a dependency of msov), after that script wrote tests/trl_dpo/:

    PYTHONPATH=. /tmp/trl/bin/python bench/record_trl_orpo.py

It writes tests/trl_dpo/trl_orpo.json: TRL's ORPOTrainer (trl.experimental.orpo) loss and logged metrics
(get_batch_loss_metrics) for each setting. The policy is tests/trl_dpo/base with tests/trl_dpo/adapter.

TRL's NLL term is the cross-entropy over the whole chosen sequence, prompt included ("orpo chosen nll loss is
computed over the full prompt and response"); msov's over the answer tokens only, as its SFT. So the `orpo` settings
are compared in their odds-ratio term and metrics, and `orpo_one_token_prompt` (each prompt cut to its first token,
which no position predicts) makes the two NLLs count the same tokens: there the whole loss is compared.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "trl_dpo"
PAD = 3
SETTINGS = [("orpo", 0.1, False), ("orpo_beta_0.5", 0.5, False), ("orpo_one_token_prompt", 0.1, True)]
METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "logps/chosen", "logps/rejected")


def trl_batch(rows: list[dict]) -> dict:
    """TRL's ORPO batch: chosen_* and rejected_* ids, attention masks and labels (prompt labels -100), padded."""
    import torch

    batch = {}
    for side in ("chosen", "rejected"):
        ids = [row["prompt_ids"] + row[f"{side}_ids"] for row in rows]
        labels = [[-100] * len(row["prompt_ids"]) + row[f"{side}_ids"] for row in rows]
        width = max(len(x) for x in ids)
        batch[f"{side}_input_ids"] = torch.tensor([x + [PAD] * (width - len(x)) for x in ids])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        batch[f"{side}_labels"] = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    return batch


def main() -> None:
    import torch
    import trl
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from mistral_sov.tools.tiny import build_tiny_tokenizer

    recorded = json.loads((OUT / "trl_dpo.json").read_text())
    tokenizer = build_tiny_tokenizer()  # only for TRL's constructor (pad token, a one-row dataset it prepares)
    record = {"trl": trl.__version__, "torch": torch.__version__, "settings": {}}
    for name, beta, one_token_prompt in SETTINGS:
        rows = recorded["rows"]
        if one_token_prompt:
            rows = [{**row, "prompt_ids": row["prompt_ids"][:1]} for row in rows]
        base = AutoModelForCausalLM.from_pretrained(OUT / "base", dtype="float32")
        model = PeftModel.from_pretrained(base, OUT / "adapter")
        with tempfile.TemporaryDirectory() as tmp:
            args = ORPOConfig(output_dir=tmp, beta=beta, report_to=[], use_cpu=True, seed=0, max_length=64)
            trainer = ORPOTrainer(model=model, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        trainer.model.eval()
        with torch.no_grad():
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch(rows), train_eval="train")
        record["settings"][name] = {"beta": beta, "one_token_prompt": one_token_prompt, "loss": loss.item(),
                                    **{key: metrics[key] for key in METRICS}}
    (OUT / "trl_orpo.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT / 'trl_orpo.json'} with TRL {trl.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
