"""Preference tuning (DPO, ORPO): the losses as plain functions, the pair collator, the Trainer's loss and the held-out
measure.

The DPO reference model is the base with the LoRA adapter switched off (PEFT's `disable_adapter()`): one copy of the
weights serves as both policy and reference, so DPO costs no more memory than SFT plus a forward pass without
gradients. A run that starts from an adapter (`model.adapter`) holds it twice, as the policy and as a frozen second
adapter named "reference" (TRL's `ref_adapter_name`): still one copy of the base. The definitions follow TRL's
`DPOTrainer` and `ORPOTrainer` (tests/test_preference.py and tests/test_orpo.py compare with values recorded from
TRL by bench/record_trl_dpo.py and bench/record_trl_orpo.py):

- a sequence's log-probability is the sum over its answer tokens (labels other than -100) of log p(token);
- rewards are beta · (policy − reference) log-probabilities, for the chosen and the rejected answer;
- sigmoid: −(1 − ε)·log σ(beta·Δ) − ε·log σ(−beta·Δ), Δ = chosen reward/beta − rejected reward/beta (conservative
  DPO; ε = 0 is the original DPO loss; TRL 1.x's sigmoid ignores ε, its `aot` loss on a single pair is this form);
- ipo: (Δ̄ − 1/(2·beta))², Δ̄ taken with each answer's log-ratio divided by its number of answer tokens, as TRL
  normalises it (the IPO authors' form);
- the batch loss is the mean over pairs.

ORPO (Hong et al. 2024) needs no reference: loss = NLL of the chosen answers (token mean over the batch) − beta ·
mean log σ(log odds), log odds = (lc − lr) − (log(1 − e^lc) − log(1 − e^lr)) with l the mean log-probability of an
answer's tokens; rewards are beta · l. TRL 1.16's NLL also counts the prompt tokens; msov's counts the answer tokens
only, as its SFT does (the odds-ratio term is TRL's exactly).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

LOSS_TYPES = ("sigmoid", "ipo")
PREFERENCE_METHODS = ("dpo", "orpo")  # the train.method values that learn from preference pairs
REFERENCE_ADAPTER = "reference"  # a start adapter's frozen copy: the DPO reference of a run from model.adapter
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


@dataclass
class OddsRatioLoss(PreferenceLoss):
    """ORPO: `losses` is each pair's odds-ratio term, −beta·log σ(log odds); `nll` the chosen answers' NLL."""

    nll: object = None
    log_odds: object = None  # per pair
    log_sigmoid: object = None  # log σ(log odds), per pair

    @property
    def loss(self):
        return self.nll + self.losses.mean()


def log1mexp(x):
    """log(1 − e^x) for x < 0, without cancellation: the branch at −log 2 that TRL's ORPO (and Mächler 2012) uses."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, *,
                    beta: float = 0.1) -> OddsRatioLoss:
    """The ORPO loss of a batch of pairs from their summed answer log-probabilities and answer token counts
    (tensors of shape [pairs]). The NLL is the token mean over every chosen answer of the batch (the Trainer's SFT
    loss of the chosen rows); the odds ratio compares answers by their mean per-token log-probability."""
    import torch.nn.functional as F

    chosen_tokens, rejected_tokens = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    nll = -policy_chosen.sum() / chosen_tokens.sum()
    chosen, rejected = (policy_chosen / chosen_tokens).float(), (policy_rejected / rejected_tokens).float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_sigmoid = F.logsigmoid(log_odds)
    return OddsRatioLoss(losses=-beta * log_sigmoid, chosen_rewards=beta * chosen.detach(),
                         rejected_rewards=beta * rejected.detach(), nll=nll, log_odds=log_odds.detach(),
                         log_sigmoid=log_sigmoid.detach())


def batch_loss(model, batch: dict, settings) -> tuple:
    """(loss result, policy chosen, policy rejected log-probabilities) of a collated batch of pairs under the
    preference objective of `settings` (a TrainSection, or anything with method, beta, loss_type, label_smoothing)."""
    if objective(settings) == "orpo":  # no reference pass at all
        policy, tokens = sequence_logps(model, batch)
        pc, pr = policy.chunk(2)
        return odds_ratio_loss(pc, pr, *tokens.chunk(2), beta=settings.beta), pc, pr
    pc, pr, rc, rr, nc, nr = pair_logps(model, batch)
    result = preference_loss(pc, pr, rc, rr, beta=settings.beta, loss_type=settings.loss_type,
                             label_smoothing=settings.label_smoothing, chosen_tokens=nc, rejected_tokens=nr)
    return result, pc, pr


def objective(settings) -> str:
    """dpo or orpo: the preference objective `settings` names (its method)."""
    return "orpo" if settings.method == "orpo" else "dpo"


def sequence_logps(model, batch: dict):
    """(summed log-probability of each row's supervised tokens, number of them), both of shape [rows].

    The LM head and log-softmax run only at the positions that predict a supervised token, a chunk of them at a
    time (`supervised_token_logps`: no [tokens, vocab] tensor), then each position's log-probability is added to
    its row."""
    import torch

    from .logits import supervised_token_logps

    logps, _, keep = supervised_token_logps(model, {k: v for k, v in batch.items() if k in MODEL_INPUTS})
    rows = keep.nonzero()[:, 0]  # row-major: the order boolean indexing gives logps
    sums = torch.zeros(keep.size(0), dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.bincount(rows, minlength=keep.size(0)).to(logps.dtype)
    return sums, counts


def _peft_inside(model):
    inner = model
    for wrapper in ("module", "_orig_mod"):  # DDP, torch.compile
        inner = getattr(inner, wrapper, inner)
    if not hasattr(inner, "disable_adapter"):
        raise TypeError("preference training needs a PEFT model: its reference is the base with the adapter off")
    return inner


@contextmanager
def reference_model(model):
    """The model as the reference, without gradients: the base with the adapter switched off, or, for a run that
    started from an adapter, that adapter's frozen copy (REFERENCE_ADAPTER) switched in, as TRL does with
    `ref_adapter_name`. `model` may be wrapped (DDP, torch.compile): the switch happens on the PEFT model inside,
    and the caller still runs the wrapper."""
    import torch

    inner = _peft_inside(model)
    if REFERENCE_ADAPTER not in inner.peft_config:
        with torch.no_grad(), inner.disable_adapter():
            yield
        return
    policy = inner.active_adapter
    # set_adapter hands requires_grad to the active adapter: inference_mode keeps the reference frozen, and the
    # switch back gives the policy its gradients again before any backward pass (under no_grad none is recorded).
    inner.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        with torch.no_grad():
            yield
    finally:
        inner.set_adapter(policy)


def drop_reference(model) -> None:
    """Remove the reference adapter (if any) once training and measuring are done: the published adapter folder
    holds the policy alone."""
    inner = _peft_inside(model)
    if REFERENCE_ADAPTER in inner.peft_config:
        inner.delete_adapter(REFERENCE_ADAPTER)


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
            result, pc, pr = batch_loss(model, inputs, settings)
            self._remember("train" if model.training else "eval", result, pc, pr)
            # No logits to hand on (prediction_loss_only): an empty dict is what the Trainer's evaluation expects.
            return (result.loss, {}) if return_outputs else result.loss

        def _remember(self, mode: str, result: PreferenceLoss, pc, pr) -> None:
            gather = self.accelerator.gather_for_metrics
            values = [("rewards/chosen", result.chosen_rewards), ("rewards/rejected", result.rejected_rewards),
                      ("rewards/margins", result.margins), ("rewards/accuracies", result.accuracies),
                      ("logps/chosen", pc.detach()), ("logps/rejected", pr.detach())]
            if isinstance(result, OddsRatioLoss):  # as TRL's ORPOTrainer logs them (means over the batches)
                values += [("nll_loss", result.nll.detach().reshape(1)),
                           ("log_odds_ratio", result.log_sigmoid.mean().reshape(1)),
                           ("log_odds_chosen", result.log_odds.mean().reshape(1))]
            for name, value in values:
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
                          label_smoothing: float = 0.0, batch_size: int = 8, method: str = "dpo") -> dict:
    """Held-out loss, mean reward margin and accuracy (chosen rewarded above rejected) over every pair. The DPO
    loss is the mean over pairs; ORPO's NLL the token mean over every chosen answer, plus its mean odds-ratio term."""
    from types import SimpleNamespace

    import torch

    settings = SimpleNamespace(method=method, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    collate = PairCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, margins, accuracies, tokens, nll_sum, chosen_tokens = [], [], [], 0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            result, _, _ = batch_loss(model, batch, settings)
            counts = (_targets(batch["labels"]) != IGNORE).sum(dim=1)
            losses.append(result.losses)
            margins.append(result.margins)
            accuracies.append(result.accuracies)
            tokens += int(counts.sum())
            if isinstance(result, OddsRatioLoss):
                chosen = int(counts.chunk(2)[0].sum())
                nll_sum, chosen_tokens = nll_sum + result.nll.item() * chosen, chosen_tokens + chosen
    if was_training:
        model.train()
    loss = torch.cat(losses).mean().item() + (nll_sum / max(chosen_tokens, 1) if chosen_tokens else 0.0)
    return {"loss": loss, "reward_accuracy": torch.cat(accuracies).mean().item(),
            "reward_margin": torch.cat(margins).mean().item(), "tokens": tokens}


def _targets(labels):
    """The next-token targets of a batch's labels (the label at each position's successor; -100 past the end)."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


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
