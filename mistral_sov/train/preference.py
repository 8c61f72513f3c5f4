"""Preference tuning (DPO): the loss as plain functions, the pair collator, the Trainer's loss and the held-out measure.

The reference model is the base with the LoRA adapter switched off (PEFT's `disable_adapter()`): one copy of the
weights serves as both policy and reference, so DPO costs no more memory than SFT plus a forward pass without
gradients. The definitions follow TRL's `DPOTrainer` (tests/test_preference.py compares with values recorded from
TRL by bench/record_trl_dpo.py):

- a sequence's log-probability is the sum over its answer tokens (labels other than -100) of log p(token);
- rewards are beta · (policy − reference) log-probabilities, for the chosen and the rejected answer;
- sigmoid: −(1 − ε)·log σ(beta·Δ) − ε·log σ(−beta·Δ), Δ = chosen reward/beta − rejected reward/beta (conservative
  DPO; ε = 0 is the original DPO loss; TRL 1.x's sigmoid ignores ε, its `aot` loss on a single pair is this form);
- ipo: (Δ̄ − 1/(2·beta))², Δ̄ taken with each answer's log-ratio divided by its number of answer tokens, as TRL
  normalises it (the IPO authors' form);
- the batch loss is the mean over pairs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

LOSS_TYPES = ("sigmoid", "ipo")
IGNORE = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "labels")  # what a collated batch hands the model; the rest is ours


@dataclass
class PreferenceLoss:
    """Per-pair values (tensors of shape [pairs]); `loss` is their mean, the number training minimises."""

    losses: object
    chosen_rewards: object
    rejected_rewards: object

    @property
    def loss(self):
        return self.losses.mean()

    @property
    def margins(self):
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self):
        """1 where the chosen answer earns more reward than the rejected one (ties count as wrong, as in TRL)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float = 0.1,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
                    rejected_tokens=None) -> PreferenceLoss:
    """The DPO loss of a batch of pairs from their summed answer log-probabilities (tensors of shape [pairs]).
    `chosen_tokens`/`rejected_tokens` (answer tokens per sequence) are needed by the IPO loss only."""
    import torch.nn.functional as F

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"preference_loss: loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        delta = chosen_ratio - rejected_ratio
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("preference_loss: the ipo loss needs chosen_tokens and rejected_tokens")
        # Summed log-ratios grow with the answer's length and the squared loss with their square: per token,
        # one beta suits short and long answers alike.
        delta = (chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1))
        losses = (delta - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses=losses, chosen_rewards=beta * chosen_ratio.detach(),
                          rejected_rewards=beta * rejected_ratio.detach())


def sequence_logps(model, batch: dict):
    """(summed log-probability of each row's supervised tokens, number of them), both of shape [rows].

    Only the positions that predict a supervised token go through the LM head (`supervised_logits`), then each
    position's log-probability is added to its row."""
    import torch
    import torch.nn.functional as F

    from .logits import supervised_logits

    labels = batch["labels"]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    rows = (targets != IGNORE).nonzero()[:, 0]
    outputs, kept = supervised_logits(model, {k: v for k, v in batch.items() if k in MODEL_INPUTS})
    logps = -F.cross_entropy(outputs.logits.float(), kept, reduction="none")
    sums = torch.zeros(labels.size(0), dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.bincount(rows, minlength=labels.size(0)).to(logps.dtype)
    return sums, counts


@contextmanager
def reference_model(model):
    """The model as the reference: the base with the adapter switched off, without gradients. `model` may be
    wrapped (DDP, torch.compile): the adapter is switched off on the PEFT model inside, and the caller still runs
    the wrapper."""
    import torch

    inner = model
    for wrapper in ("module", "_orig_mod"):  # DDP, torch.compile
        inner = getattr(inner, wrapper, inner)
    if not hasattr(inner, "disable_adapter"):
        raise TypeError("preference training needs a PEFT model: its reference is the base with the adapter off")
    with torch.no_grad(), inner.disable_adapter():
        yield


def pair_logps(model, batch: dict) -> tuple:
    """Policy and reference log-probabilities of a collated batch of pairs (chosen rows first, then rejected):
    (policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens)."""
    policy, tokens = sequence_logps(model, batch)
    if "reference_logps" in batch:
        reference = batch["reference_logps"]
    else:
        with reference_model(model):
            reference, _ = sequence_logps(model, batch)
    return (*policy.chunk(2), *reference.chunk(2), *tokens.chunk(2))


@dataclass
class PairCollator:
    """A batch of pairs as one batch of 2·pairs rows, the chosen answers first, padded to the longest row:
    policy and reference each take one forward pass per step. Padded labels are -100, padded ids the pad token."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        ids = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        labels = [row["chosen_labels"] for row in rows] + [row["rejected_labels"] for row in rows]
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([list(x) + [self.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([list(x) + [IGNORE] * (width - len(x)) for x in labels]),
        }
        if "reference_chosen" in rows[0]:  # precomputed (train.precompute_ref): no reference pass in training
            batch["reference_logps"] = torch.tensor([row["reference_chosen"] for row in rows]
                                                    + [row["reference_rejected"] for row in rows])
        return batch


def preference_trainer_class(base, settings):
    """A subclass of the Trainer class `base` whose loss is the DPO loss of `settings` (a TrainSection), and that
    adds the mean rewards, margins and accuracy of the steps since the last log line to the line."""
    import torch

    class PreferenceTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The loss is a mean over pairs, not a sum over tokens: the Trainer averages over accumulation itself.
            self.model_accepts_loss_kwargs = False
            self._pending = {"train": {}, "eval": {}}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pc, pr, rc, rr, nc, nr = pair_logps(model, inputs)
            result = preference_loss(pc, pr, rc, rr, beta=settings.beta, loss_type=settings.loss_type,
                                     label_smoothing=settings.label_smoothing, chosen_tokens=nc, rejected_tokens=nr)
            self._remember("train" if model.training else "eval", result, pc, pr)
            # No logits to hand on (prediction_loss_only): an empty dict is what the Trainer's evaluation expects.
            return (result.loss, {}) if return_outputs else result.loss

        def _remember(self, mode: str, result: PreferenceLoss, pc, pr) -> None:
            gather = self.accelerator.gather_for_metrics
            for name, value in (("rewards/chosen", result.chosen_rewards),
                                ("rewards/rejected", result.rejected_rewards), ("rewards/margins", result.margins),
                                ("rewards/accuracies", result.accuracies), ("logps/chosen", pc.detach()),
                                ("logps/rejected", pr.detach())):
                self._pending[mode].setdefault(name, []).append(gather(value.float()).detach().cpu())

        def log(self, logs, *args, **kwargs):
            mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
            prefix = "eval_" if mode == "eval" else ""
            # Means over every pair seen since the last line, so a line describes the steps it stands for.
            logs = {**logs, **{prefix + name: round(torch.cat(values).mean().item(), 6)
                               for name, values in self._pending[mode].items()}}
            self._pending[mode] = {}
            return super().log(logs, *args, **kwargs)

    return PreferenceTrainer


def preference_evaluation(model, dataset, *, pad_token_id: int, beta: float, loss_type: str = "sigmoid",
                          label_smoothing: float = 0.0, batch_size: int = 8) -> dict:
    """Held-out DPO loss, mean reward margin and accuracy (chosen rewarded above rejected) over every pair."""
    import torch

    collate = PairCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, margins, accuracies, tokens = [], [], [], 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            pc, pr, rc, rr, nc, nr = pair_logps(model, batch)
            result = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                     label_smoothing=label_smoothing, chosen_tokens=nc, rejected_tokens=nr)
            losses.append(result.losses)
            margins.append(result.margins)
            accuracies.append(result.accuracies)
            tokens += int(nc.sum() + nr.sum())
    if was_training:
        model.train()
    loss = torch.cat(losses).mean().item()
    return {"loss": loss, "reward_accuracy": torch.cat(accuracies).mean().item(),
            "reward_margin": torch.cat(margins).mean().item(), "tokens": tokens}


def with_reference_logps(model, dataset, *, pad_token_id: int, batch_size: int = 8):
    """The dataset with each pair's reference log-probabilities as two more columns (reference_chosen,
    reference_rejected), computed once, in order, with the adapter off: training then runs one forward pass per
    step instead of two. Computed again on resume (the reference is the base: the same numbers)."""
    collate = PairCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate([{k: v for k, v in row.items() if not k.startswith("reference_")}
                                                       for row in rows]).items()}
        with reference_model(model):
            logps, _ = sequence_logps(model, batch)
        first, second = logps.float().cpu().chunk(2)
        chosen += first.tolist()
        rejected += second.tolist()
    if was_training:
        model.train()
    return dataset.add_column("reference_chosen", chosen).add_column("reference_rejected", rejected)
