"""The command line as a user runs it: synth, train, evaluate, and clear errors."""

import json

from cada.cli import main
from cada.config import DEFAULT_METHOD, preset

from helpers import train_args

DEFAULT_ALIGN = preset("cpu").align  # what `cada train` aligns with unless told


def test_train_then_evaluate_writes_the_documented_json(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, iters=3, align_iters=5)) == 0
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "absolute-unified" in printed and "model-unified" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    assert {(r["align"], r["protocol"]) for r in results["rows"]} == {
        (a, p) for a in ("none", DEFAULT_ALIGN) for p in ("absolute-unified", "model-unified")
    }
    for row in results["rows"]:
        assert row["method"] == DEFAULT_METHOD
        for key in ("i_auroc", "i_ap", "p_auroc", "p_ap"):
            assert 0.0 <= row[key] <= 1.0
    assert set(results["per_class"][DEFAULT_ALIGN]) == {"weave", "marble", "washer", "circuit"}


def test_epochs_option_resolves_to_iterations_said_in_the_first_line(tiny_data, tmp_path, capsys):
    from cada.api import Detector

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(run),
                "--image-size",
                "64",
                "--epochs",
                "2",
                "--align-iters",
                "2",
            ]
        )
        == 0
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training revdist") and "3 iters of batch 16 = 2.0 passes over 24 images" in first
    detector = Detector.load(run)
    assert detector.training_info["base_iters"] == 3 and detector.settings.base.epochs == 2
    both = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "both"), "--iters", "3", "--epochs", "2"]
    assert main(both) == 2  # one length or the other
    capsys.readouterr()
    zero = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "zero"), "--epochs", "0", "--quiet"]
    assert main(zero) == 2  # refused by the argument parser
    assert "--epochs: must be a positive number, got 0" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()


def test_synth_writes_the_mvtec_layout(tmp_path):
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "s"),
                "--n-train",
                "2",
                "--n-test-good",
                "1",
                "--n-test-defect",
                "1",
                "--image-size",
                "64",
            ]
        )
        == 0
    )
    assert (tmp_path / "s" / "weave" / "train" / "good").is_dir()


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--data", str(tmp_path), "--quiet"]) == 2
    assert "not a cada run" in capsys.readouterr().err


def test_unknown_choice_is_refused_by_the_parser_in_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path), "--align", "magic"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("cada train: error: argument --align: invalid choice: 'magic'") and error.count("\n") == 1


def test_ablate_trains_the_base_once_and_prints_the_three_tables(tiny_data, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert (
        main(
            [
                "ablate",
                "--data",
                str(tiny_data),
                "--out",
                str(out),
                "--image-size",
                "64",
                "--iters",
                "2",
                "--align-iters",
                "3",
                "--noise",
                "0.5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for title in ("Table 3", "Table 4", "Table 5", "noisy training set"):
        assert title in printed
    assert printed.count("training revdist") == 1  # one base run from the CLI; the noisy base is the only other
    # the paper's tables study RevDist's base unless --method (or a --config file) names another
    assert json.loads((out / "base" / "config.json").read_text())["settings"]["method"] == "revdist"
    report = json.loads((out / "ablation.json").read_text())
    variants = [entry["variant"] for entry in report["tables"][next(iter(report["tables"]))]]
    assert "structure: 2 conv, 2 linear" in variants and "score: max" in variants
    assert report["noise"]["moved"] == 8  # half of the 4 anomalous test images of each of the 4 classes


def test_evaluate_plots_the_score_distributions(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run)) == 0
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--plots", str(tmp_path / "plots"), "--quiet"]) == 0
    figure = tmp_path / "plots" / "score_distributions.png"
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:4] == b"\x89PNG"


def test_verbose_shows_the_details_and_the_library_alone_prints_nothing(tiny_data, tmp_path, capsys):
    from cada.workflows import make_settings, train

    assert main(train_args(tiny_data, tmp_path / "quiet")) == 0  # train_args asks for --quiet: no progress bars
    printed = capsys.readouterr().out
    assert "training revdist" in printed and "settings: {" not in printed
    assert main(["--verbose", *train_args(tiny_data, tmp_path / "verbose")]) == 0
    printed = capsys.readouterr().out
    assert "settings: {" in printed and f"saved run to {tmp_path / 'verbose'}" in printed

    # From Python the library logs (logger "cada") and prints nothing unless the caller shows its log.
    settings = make_settings("cpu", "revdist", image_size=64, iters=2, align_iters=2)
    train(settings, tiny_data, tmp_path / "python", progress=False)
    assert capsys.readouterr().out == ""
