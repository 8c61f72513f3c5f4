"""loss.png: training and held-out loss against step, with the learning rate on a second axis.

Drawn from metrics.jsonl (one line per logging step) plus the held-out loss msov measures before and after
training, so the picture and the numbers in run.json can never disagree. Preference runs (DPO, ORPO) get a second
panel: reward margin and accuracy, in training and held out (every train.eval_steps, and before and after).
matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import os
from pathlib import Path

TRAIN_COLOUR, EVAL_COLOUR, LR_COLOUR, ACCURACY_COLOUR = "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c"
REWARD_SERIES = ("margins", "accuracy", "eval_margins", "eval_accuracy")


def loss_series(records: list[dict], eval_before: float | None = None, eval_after: float | None = None,
                final_step: int | None = None, *,
                held_out_rewards: list[tuple[int, float, float]] = ()) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs for train loss, held-out loss and learning rate, in step order; for preference runs
    the reward margins and accuracies too. `held_out_rewards`: (step, margin, accuracy) measured outside the
    Trainer's evaluation (msov's before and after training), drawn with the Trainer's eval_rewards/* points."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    lr = [(r["step"], r["learning_rate"]) for r in records if "learning_rate" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if eval_before is not None:
        held_out.append((0, eval_before))
    if eval_after is not None:
        last = final_step if final_step is not None else max((s for s, _ in train + held_out), default=0)
        if not any(step == last for step, _ in held_out):  # the Trainer may already have evaluated there
            held_out.append((last, eval_after))
    series = {"train": sorted(train), "eval": sorted(held_out), "lr": sorted(lr)}
    # Preference tuning (DPO, ORPO) logs its rewards: the mean margin (chosen minus rejected) and the share of pairs
    # won, in training and on the held-out pairs; ORPO its chosen answers' NLL too.
    for name, key, extra in (("margins", "rewards/margins", ()), ("accuracy", "rewards/accuracies", ()),
                             ("eval_margins", "eval_rewards/margins", [(s, m) for s, m, _ in held_out_rewards]),
                             ("eval_accuracy", "eval_rewards/accuracies", [(s, a) for s, _, a in held_out_rewards]),
                             ("nll", "nll_loss", ())):
        points = [(r["step"], r[key]) for r in records if key in r]
        points += [(step, value) for step, value in extra if value is not None
                   and not any(step == seen for seen, _ in points)]  # the Trainer may have evaluated there already
        if points:
            series[name] = sorted(points)
    return series


def loss_figure(series: dict[str, list[tuple[int, float]]], title: str = ""):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rewards = any(series.get(name) for name in REWARD_SERIES)
    figure = Figure(figsize=(8, 7 if rewards else 4.5), dpi=100, layout="constrained")
    loss_axis = figure.add_subplot(2, 1, 1) if rewards else figure.add_subplot()
    if series["train"]:
        steps, values = zip(*series["train"])
        loss_axis.plot(steps, values, color=TRAIN_COLOUR, marker="." if len(steps) < 40 else None,
                       label="train loss")
    if series["eval"]:
        steps, values = zip(*series["eval"])
        loss_axis.plot(steps, values, color=EVAL_COLOUR, marker="o", linestyle="--", label="held-out loss")
    if series.get("nll"):
        steps, values = zip(*series["nll"])
        loss_axis.plot(steps, values, color=TRAIN_COLOUR, linestyle=":", label="chosen answers' NLL")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axis.set_ylabel(("ORPO loss (NLL + odds-ratio term)" if series.get("nll") else "DPO loss (mean over pairs)")
                         if rewards else "loss (cross-entropy per supervised token)")
    loss_axis.grid(alpha=0.3)
    handles, labels = loss_axis.get_legend_handles_labels()
    if series["lr"]:
        lr_axis = loss_axis.twinx()
        steps, values = zip(*series["lr"])
        lr_axis.plot(steps, values, color=LR_COLOUR, linewidth=1, alpha=0.8, label="learning rate")
        lr_axis.set_ylabel("learning rate", color=LR_COLOUR)
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        more_handles, more_labels = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        loss_axis.legend(handles, labels, loc="upper right")
    loss_axis.set_title(title or "loss")
    if rewards:
        _reward_axes(figure, series)
    return figure


def _reward_axes(figure, series: dict) -> None:
    """Below the loss: the reward margin (left axis) and reward accuracy (right axis), in training (lines) and on
    the held-out pairs (dashed, with markers), as metrics.jsonl and run.json hold them."""
    from matplotlib.ticker import MaxNLocator

    margin_axis = figure.add_subplot(2, 1, 2)
    margin_axis.set_xlabel("optimizer step")
    margin_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    margin_axis.set_ylabel("reward margin (chosen - rejected)")
    margin_axis.grid(alpha=0.3)
    if series.get("margins"):
        steps, values = zip(*series["margins"])
        margin_axis.plot(steps, values, color=TRAIN_COLOUR, marker=".", label="train reward margin")
    if series.get("eval_margins"):
        steps, values = zip(*series["eval_margins"])
        margin_axis.plot(steps, values, color=TRAIN_COLOUR, marker="o", linestyle="--", label="held-out reward margin")
    accuracy_axis = margin_axis.twinx()
    accuracy_axis.set_ylim(-0.05, 1.05)
    accuracy_axis.set_ylabel("reward accuracy (chosen > rejected)")
    if series.get("accuracy"):
        steps, values = zip(*series["accuracy"])
        accuracy_axis.plot(steps, values, color=ACCURACY_COLOUR, marker=".", linewidth=1,
                           label="train reward accuracy")
    if series.get("eval_accuracy"):
        steps, values = zip(*series["eval_accuracy"])
        accuracy_axis.plot(steps, values, color=ACCURACY_COLOUR, marker="s", linestyle="--", linewidth=1,
                           label="held-out reward accuracy")
    handles, labels = margin_axis.get_legend_handles_labels()
    more_handles, more_labels = accuracy_axis.get_legend_handles_labels()
    if handles or more_handles:
        margin_axis.legend(handles + more_handles, labels + more_labels, loc="lower right")
    margin_axis.set_title("rewards")


def write_loss_plot(path: Path, records: list[dict], *, eval_before: float | None = None,
                    eval_after: float | None = None, final_step: int | None = None, title: str = "",
                    held_out_rewards: list[tuple[int, float, float]] = ()) -> Path:
    """Draw and write the PNG atomically (a temp name, then a rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = loss_figure(loss_series(records, eval_before, eval_after, final_step,
                                     held_out_rewards=held_out_rewards), title)
    FigureCanvasAgg(figure)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # No "Software" stamp: the picture of the same run is the same bytes, whatever matplotlib drew it.
        figure.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written picture must not travel into the published run
        raise
    return path
