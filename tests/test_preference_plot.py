"""loss.png for preference runs: held-out reward margin and accuracy (eval_steps, before, after) are drawn."""

from __future__ import annotations


def records(orpo: bool = False) -> list[dict]:
    lines = []
    for step in (1, 2, 3, 4):
        line = {"step": step, "loss": 0.7 - 0.1 * step, "learning_rate": 1e-3, "rewards/margins": 0.1 * step,
                "rewards/accuracies": 0.25 * step}
        if orpo:
            line["nll_loss"] = 3.0 - 0.2 * step
        lines.append(line)
    lines.append({"step": 2, "eval_loss": 0.6, "eval_rewards/margins": 0.15, "eval_rewards/accuracies": 0.5})
    lines.append({"step": 4, "eval_loss": 0.4, "eval_rewards/margins": 0.35, "eval_rewards/accuracies": 0.9})
    return lines


def drawn(axis) -> dict[str, list[tuple]]:
    return {line.get_label(): [tuple(map(float, p)) for p in zip(*line.get_data())] for line in axis.lines}


def test_held_out_rewards_are_drawn_from_metrics_and_from_before_and_after():
    from mistral_sov.train.loss_plot import loss_figure, loss_series

    # before (step 0) measured by msov; after at step 4, where the Trainer's evaluation already gave a point
    series = loss_series(records(), 0.69, 0.41, 4, held_out_rewards=[(0, 0.0, 0.0), (4, 0.99, 0.99)])
    assert series["eval_margins"] == [(0, 0.0), (2, 0.15), (4, 0.35)]
    assert series["eval_accuracy"] == [(0, 0.0), (2, 0.5), (4, 0.9)]
    figure = loss_figure(series)
    loss_axis, _lr, margin_axis, accuracy_axis = figure.axes
    assert loss_axis.get_ylabel().startswith("DPO loss")
    assert drawn(margin_axis)["held-out reward margin"] == series["eval_margins"]
    assert drawn(margin_axis)["train reward margin"] == series["margins"]
    assert drawn(accuracy_axis)["held-out reward accuracy"] == series["eval_accuracy"]
    assert drawn(accuracy_axis)["train reward accuracy"] == series["accuracy"]


def test_orpo_plot_names_its_loss_and_draws_the_nll(tmp_path):
    from mistral_sov.train.loss_plot import loss_figure, loss_series, write_loss_plot

    series = loss_series(records(orpo=True))
    loss_axis = loss_figure(series).axes[0]
    assert loss_axis.get_ylabel().startswith("ORPO loss")
    assert drawn(loss_axis)["chosen answers' NLL"] == [(1.0, 2.8), (2.0, 2.6), (3.0, 2.4), (4.0, 2.2)]
    written = write_loss_plot(tmp_path / "loss.png", records(orpo=True), held_out_rewards=[(0, 0.0, 0.5)])
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_plot_has_no_reward_panel():
    from mistral_sov.train.loss_plot import loss_figure, loss_series

    series = loss_series([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.6}])
    assert not any(key in series for key in ("margins", "eval_margins", "nll"))
    assert len(loss_figure(series).axes) == 1
