"""The command line as a user runs it: synth, train, evaluate, and clear errors."""

import json

import pytest

from cada.cli import main


def test_train_then_evaluate_writes_the_documented_json(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--out", str(run), "--image-size", "64", "--iters", "3", "--align-iters", "5",
            "--quiet"]
    assert main(["train", *args]) == 0
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "absolute-unified" in printed and "model-unified" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    assert {(r["align"], r["protocol"]) for r in results["rows"]} == {
        (a, p) for a in ("none", "cada") for p in ("absolute-unified", "model-unified")
    }
    for row in results["rows"]:
        assert row["method"] == "revdist"
        for key in ("i_auroc", "i_ap", "p_auroc", "p_ap"):
            assert 0.0 <= row[key] <= 1.0
    assert set(results["per_class"]["cada"]) == {"weave", "marble", "washer", "circuit"}


def test_synth_writes_the_mvtec_layout(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "s"), "--n-train", "2", "--n-test-good", "1", "--n-test-defect", "1",
                 "--image-size", "64"]) == 0
    assert (tmp_path / "s" / "weave" / "train" / "good").is_dir()


def test_bad_input_gets_one_clear_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--data", str(tmp_path), "--quiet"]) == 2
    assert "not a cada run" in capsys.readouterr().err


def test_unknown_choice_is_refused_by_the_parser(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path), "--align", "magic"])
