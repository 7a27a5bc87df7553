"""The per-step training log: RUN/train_log.csv, TensorBoard scalars with --logger tensorboard, the report's curve."""

import json
import sys

import pytest

from cada.api import Detector
from cada.cli import main
from cada.engine.log import FIELDS, read_log, require_tensorboard

from helpers import train_args


@pytest.fixture(scope="module")
def logged_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("logged") / "run"
    args = train_args(
        tiny_data, run, "--method", "revdist", "--align", "cada", "--logger", "tensorboard", iters=4, align_iters=5
    )
    assert main(args) == 0
    return run


def test_every_step_of_every_stage_is_logged(logged_run):
    rows = read_log(logged_run / "train_log.csv")
    assert list(rows[0]) == list(FIELDS)
    assert [(row["stage"], row["step"]) for row in rows] == [("revdist", s) for s in range(1, 5)] + [
        ("cada regressor", s) for s in range(1, 6)
    ]
    settings = json.loads((logged_run / "config.json").read_text())
    training, lrs = settings["training"], settings["settings"]
    base, aligner = rows[:4], rows[4:]
    # the same losses the run's config summarises, the learning rates the settings give
    assert [base[0]["loss"], base[-1]["loss"]] == training["base_loss_first_last"]
    assert [aligner[0]["loss"], aligner[-1]["loss"]] == training["aligner_loss_first_last"]
    assert {row["lr"] for row in base} == {lrs["base"]["lr"]}
    assert {row["lr"] for row in aligner} == {lrs["aligner"]["lr"]}
    assert all(row["images_per_second"] > 0 for row in rows)


def test_tensorboard_scalars_hold_the_same_losses(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard"))
    events.Reload()
    rows = read_log(logged_run / "train_log.csv")
    for stage, steps in (("revdist", 4), ("cada regressor", 5)):
        logged = events.Scalars(f"{stage}/loss")
        assert [event.step for event in logged] == list(range(1, steps + 1))
        expected = [row["loss"] for row in rows if row["stage"] == stage]
        assert [event.value for event in logged] == pytest.approx(expected, rel=1e-6)  # stored as float32


def test_tensorboard_missing_is_one_line_before_training(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        require_tensorboard()
    assert main(train_args(tiny_data, tmp_path / "run", "--logger", "tensorboard")) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_report_shows_the_loss_curves(logged_run, tiny_data, tmp_path):
    assert main(["evaluate", str(logged_run), "--data", str(tiny_data), "--report", str(tmp_path), "--quiet"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Training loss</h2>" in page and (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_a_damaged_log_does_not_stop_the_run_from_loading(logged_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(logged_run, copy)
    (copy / "train_log.csv").write_text("step,loss\n1,oops\n")
    with pytest.warns(UserWarning, match="not a readable training log"):
        detector = Detector.load(copy)
    assert detector.training_log == [] and detector.fitted
    assert len(Detector.load(logged_run).training_log) == 9
