"""Record TRL's DPO loss and rewards on a fixed tiny model and a fixed batch, for tests/test_preference.py.

TRL is not one of msov's dependencies and must not become one: run this in a separate virtual environment that
has TRL, with the same torch, transformers and peft as msov's, e.g.

    python -m venv /tmp/trl
    # reuse msov's torch/transformers/peft read-only, so both sides run the same numerics
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/trl/lib/python3.11/site-packages/msov.pth
    /tmp/trl/bin/pip install trl
    PYTHONPATH=. /tmp/trl/bin/python bench/record_trl_dpo.py

It writes tests/trl_dpo/: the tiny base model (config.json, model.safetensors), the LoRA adapter (adapter/, its B
matrices set to fixed non-zero values so the policy differs from the reference) and trl_dpo.json (the batch as token
ids, and TRL's loss, rewards, margins and accuracy for each loss setting). The reference is what TRL uses for a
fresh PEFT adapter: the same model with the adapter disabled.

TRL 1.x applies no label smoothing to its `sigmoid` loss; its `aot` loss on a single pair (sorting one value
changes nothing) is exactly the conservative-DPO form -(1-e)·log σ(βΔ) - e·log σ(-βΔ), so label smoothing is
recorded pair by pair through it.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "trl_dpo"
VOCAB = 256
SETTINGS = [  # name, TRL loss_type, beta, label_smoothing, pair by pair
    ("sigmoid", "sigmoid", 0.1, 0.0, False),
    ("sigmoid_beta_0.5", "sigmoid", 0.5, 0.0, False),
    ("ipo", "ipo", 0.1, 0.0, False),
    ("sigmoid_smoothed", "aot", 0.1, 0.2, True),
]


def fixed_batch() -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(1234)
    rows = []
    for prompt_len, chosen_len, rejected_len in ((4, 3, 6), (6, 5, 2), (3, 7, 4)):
        def ids(n):
            return torch.randint(8, VOCAB, (n,), generator=generator).tolist()
        rows.append({"prompt_ids": ids(prompt_len), "chosen_ids": ids(chosen_len), "rejected_ids": ids(rejected_len)})
    return rows


def build_model():
    import torch
    from peft import LoraConfig
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           tie_word_embeddings=False, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    return model, lora


def main() -> None:
    import torch
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from mistral_sov.tools.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # only for TRL's constructor (pad token, a one-row dataset it prepares)
    rows = fixed_batch()
    record = {"trl": trl.__version__, "torch": torch.__version__, "rows": rows, "settings": {}}
    OUT.mkdir(parents=True, exist_ok=True)
    for name, loss_type, beta, smoothing, pair_by_pair in SETTINGS:
        model, lora = build_model()
        if name == "sigmoid":  # before TRL wraps it: get_peft_model injects the LoRA layers in place
            model.save_pretrained(OUT / "base")
        with tempfile.TemporaryDirectory() as tmp:
            args = DPOConfig(output_dir=tmp, beta=beta, loss_type=[loss_type], label_smoothing=smoothing,
                             report_to=[], use_cpu=True, seed=0)
            trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                                 train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        peft_model = trainer.model
        generator = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for pname, param in sorted(peft_model.named_parameters()):
                if "lora_B" in pname:  # fresh LoRA B is zero: the policy would equal the reference
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        peft_model.eval()
        collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
        batches = [[row] for row in rows] if pair_by_pair else [rows]
        out = {"trl_loss_type": loss_type, "beta": beta, "label_smoothing": smoothing, "pair_by_pair": pair_by_pair,
               "loss": [], "rewards_chosen": [], "rewards_rejected": [], "margins": [], "accuracy": [],
               "logps_chosen": [], "logps_rejected": []}
        for batch in batches:
            trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            with torch.no_grad():
                loss = trainer.compute_loss(peft_model, collate(batch))
            metrics = trainer._metrics["eval"]
            out["loss"].append(loss.item())
            for key, metric in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                                ("margins", "rewards/margins"), ("accuracy", "rewards/accuracies"),
                                ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
                out[key].append(metrics[metric][-1])
        record["settings"][name] = out
        if name == "sigmoid":
            peft_model.save_pretrained(OUT / "adapter")
            (OUT / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's model card template: nothing to test
    (OUT / "trl_dpo.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT} with TRL {trl.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
