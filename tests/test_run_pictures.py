"""loss.png and TensorBoard event files: drawn from what the run measured, and only where asked."""

import json
import struct

import pytest
import yaml
from conftest import small_recipe

from mistral_sov.recipe import load_recipe
from mistral_sov.train.loss_plot import loss_figure, loss_series
from mistral_sov.train.pipeline import finetune

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_with_tensorboard(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    data = small_recipe(tiny_model, root / "out", max_steps=8, eval_steps=4, tensorboard=True)
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    return finetune(load_recipe(root / "r.yaml")), root / "out"


def test_series_come_from_the_metrics_and_the_held_out_losses():
    records = [{"step": 2, "loss": 5.0, "learning_rate": 1e-3}, {"step": 4, "loss": 4.0, "learning_rate": 5e-4},
               {"step": 4, "eval_loss": 4.5}, {"step": 6, "loss": 3.0, "learning_rate": 0.0}]
    series = loss_series(records, eval_before=6.0, eval_after=3.5, final_step=6)
    assert series["train"] == [(2, 5.0), (4, 4.0), (6, 3.0)]
    assert series["eval"] == [(0, 6.0), (4, 4.5), (6, 3.5)]
    assert series["lr"] == [(2, 1e-3), (4, 5e-4), (6, 0.0)]
    # The Trainer's own final evaluation and msov's "after" are the same point, not two.
    assert loss_series([{"step": 6, "eval_loss": 3.5}], eval_after=3.5, final_step=6)["eval"] == [(6, 3.5)]

    figure = loss_figure(series)
    loss_axis, lr_axis = figure.axes
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in loss_axis.lines}
    assert drawn == {"train loss": series["train"], "held-out loss": series["eval"]}
    assert [list(zip(line.get_xdata(), line.get_ydata())) for line in lr_axis.lines] == [series["lr"]]
    assert lr_axis.get_ylabel() == "learning rate"


def test_run_writes_loss_png(run_with_tensorboard):
    summary, out = run_with_tensorboard
    png = (out / "loss.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (800, 450)
    assert json.loads((out / "run.json").read_text())["loss_plot"] == str(out / "loss.png")
    assert not list(out.glob(".loss.png*"))  # no temp file left behind


def _tensorboard_scalars(folder):
    """Scalars of every event file under `folder`, read straight from the TFRecord framing."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, round(value.simple_value, 4)))
    return scalars


def test_tensorboard_event_files_hold_the_logged_losses(run_with_tensorboard):
    summary, out = run_with_tensorboard
    scalars = _tensorboard_scalars(out / "tensorboard")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert scalars["train/loss"] == [(m["step"], round(m["loss"], 4)) for m in metrics if "loss" in m]
    assert scalars["eval/loss"] == [(m["step"], round(m["eval_loss"], 4)) for m in metrics if "eval_loss" in m]
    assert [step for step, _ in scalars["train/learning_rate"]] == [m["step"] for m in metrics if "loss" in m]


def test_no_tensorboard_files_unless_asked(tiny_model, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(small_recipe(tiny_model, tmp_path / "out", max_steps=2)))
    finetune(load_recipe(tmp_path / "r.yaml"))
    assert not (tmp_path / "out" / "tensorboard").exists()
    assert (tmp_path / "out" / "loss.png").is_file()
