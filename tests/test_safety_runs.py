"""Never lose a user's work: runs replaced only when asked and whole, checkpoints kept until their replacement is
on disk, user folders beside and inside a run never touched, bad output places refused with one line before any
work. Each test failed on the code before its fix.
"""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from safetensors import SafetensorError

from cada.cli import main

from helpers import stop_after_steps, train_args


def _one_line(capsys) -> str:
    """The error output, asserted to be one line (no traceback)."""
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("cada "), error
    return error


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """A trained, calibrated run; tests that change it work on a copy (`run_copy`)."""
    run = tmp_path_factory.mktemp("safety") / "run"
    assert main(train_args(tiny_data, run)) == 0
    normal = [str(tiny_data / name / "train" / "good") for name in ("weave", "marble")]
    assert main(["calibrate", str(run), "--normal", *normal, "--fpr", "0.1"]) == 0
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture
def line_images(tiny_data, tmp_path):
    """A flat folder of 5 test images, no layout."""
    folder = tmp_path / "line"
    folder.mkdir()
    for i, path in enumerate(sorted((tiny_data / "washer" / "test").rglob("*.png"))[:5]):
        shutil.copy(path, folder / f"img{i}.png")
    return folder


def _files(folder) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# -- run folders are never overwritten by accident; one writer; outputs never on the run's own files -------------------


def test_an_existing_run_is_replaced_only_with_overwrite_and_by_one_writer(tiny_data, run_copy, tmp_path, capsys):
    before = _files(run_copy)
    assert main(train_args(tiny_data, run_copy)) == 2
    error = _one_line(capsys)
    assert "already holds a trained run" in error and "calibrated" in error and "--overwrite" in error
    assert _files(run_copy) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert main(train_args(tiny_data, other, "--overwrite")) == 2  # not a run: never replaced
    assert "not empty and is not a cada run" in _one_line(capsys) and (other / "mine.txt").read_text() == "keep"

    # A second writer is refused while the first one's process lives; a dead one's lock is taken over.
    lock = tmp_path / ".run.lock"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{writer.pid}\n")
        assert main(train_args(tiny_data, run_copy, "--overwrite")) == 2
        assert f"being written by another cada process (pid {writer.pid})" in _one_line(capsys)
    finally:
        writer.kill()
        writer.wait()
    assert _files(run_copy) == before
    assert main(train_args(tiny_data, run_copy, "--overwrite")) == 0  # the lock's process is gone
    assert "taking over the lock" in capsys.readouterr().err
    assert not lock.exists()
    config = json.loads((run_copy / "config.json").read_text())
    assert config["calibration"] is None and sorted(p.name for p in run_copy.iterdir()) == [
        "config.json",
        "model.safetensors",
        "train_log.csv",
    ]
    assert not list(tmp_path.glob(".run.*"))  # no staging folder left beside it

    # An unfinished training is continued with --resume, not silently restarted.
    unfinished = tmp_path / "unfinished"
    (unfinished / "resume").mkdir(parents=True)
    assert main(train_args(tiny_data, unfinished)) == 2
    assert "unfinished training" in _one_line(capsys)

    # Outputs never land on the run's own files.
    weights = (run_copy / "model.safetensors").read_bytes()
    assert (
        main(
            [
                "evaluate",
                str(run_copy),
                "--data",
                str(tiny_data),
                "--json",
                str(run_copy / "model.safetensors"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "would overwrite" in _one_line(capsys)
    assert (run_copy / "model.safetensors").read_bytes() == weights


def test_calibrate_says_which_threshold_it_replaced_and_demo_needs_overwrite(tiny_data, run_copy, tmp_path, capsys):
    old = json.loads((run_copy / "config.json").read_text())["calibration"]["threshold"]
    weights = (run_copy / "model.safetensors").read_bytes()
    assert (
        main(["calibrate", str(run_copy), "--normal", str(tiny_data / "washer" / "train" / "good"), "--fpr", "0.2"])
        == 0
    )
    assert f"replaced the previous threshold {old:.4f}" in capsys.readouterr().out
    assert (run_copy / "model.safetensors").read_bytes() == weights  # only the config changes

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "results.json").write_text("{}")
    assert main(["demo", "--out", str(demo), "--iters", "1", "--quiet"]) == 2
    assert "--overwrite" in _one_line(capsys) and (demo / "results.json").read_text() == "{}"


# -- the run is written whole before its checkpoint goes; a failed save keeps the checkpoint ---------------------------


def test_a_failed_save_keeps_the_checkpoint_and_the_old_run(tiny_data, run_copy, tmp_path, monkeypatch, capsys):
    import cada.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save_file = cada.checkpoint.save_file

    def run_save_fails(tensors, path, metadata=None):  # the disk fills up after the last training checkpoint
        if ".new-" not in path:
            return real_save_file(tensors, path, metadata=metadata)
        # What safetensors raises on a full disk (seen on a full tmpfs): its own error type, not an OSError.
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "new"
    with monkeypatch.context() as patch:
        patch.setattr(cada.checkpoint, "save_file", run_save_fails)
        assert main(train_args(tiny_data, out)) == 2
    error = _one_line(capsys)
    assert "No space left on device" in error and "--resume" in error and "checkpoint is kept" in error
    assert (out / "resume" / "state.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert main(train_args(tiny_data, out, "--resume")) == 0  # the retry the message names
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "train_log.csv"]

    # Weights and config are replaced together: a save failing after the weights leaves the old run whole.
    before = _files(run_copy)
    with monkeypatch.context() as patch:
        patch.setattr(cada.checkpoint, "write_json", disk_full)
        assert main(train_args(tiny_data, run_copy, "--overwrite", "--seed", "1")) == 2
    capsys.readouterr()
    assert {k: v for k, v in _files(run_copy).items() if k.parts[0] != "resume"} == before
    assert not list(tmp_path.glob(".run.*"))


# -- --resume compares the training data, not only their count ---------------------------------------------------------


def test_resume_refuses_other_data_of_the_same_count(tiny_data, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    changed = tmp_path / "changed"
    shutil.copytree(tiny_data, changed)
    first = sorted((changed / "weave" / "train" / "good").glob("*.png"))[0]
    pixels = np.array(Image.open(first))
    Image.fromarray(255 - pixels).save(first)  # same name, same count, other content

    run = tmp_path / "run"
    with stop_after_steps(1):
        assert main(train_args(tiny_data, run)) == 130
    capsys.readouterr()
    assert main(train_args(changed, run, "--resume")) == 2
    assert "training data differ" in _one_line(capsys)
    assert main(train_args(tiny_data, run, "--resume")) == 0


# -- names that are not UTF-8 are written escaped, every output file atomically ----------------------------------------


def test_a_file_name_that_is_not_utf8_breaks_no_output(trained_run, line_images, tmp_path, capsys):
    bad_name = os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8
    try:
        shutil.copy(line_images / "img0.png", line_images / bad_name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take file names that are not UTF-8")
    out = tmp_path / "out"
    assert main(["predict", str(trained_run), str(line_images), "--out", str(out), "--overlays", "--quiet"]) == 0
    with open(out / "predictions.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and any(r["path"].endswith("caf\\xe9.png") for r in rows)
    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))["predictions"]
    assert [p["path"] for p in predictions] == [r["path"] for r in rows]
    assert len(list((out / "overlays").glob("*.png"))) == 6
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                str(trained_run),
                "--format",
                "folder",
                "--normal",
                str(line_images),
                "--anomalous",
                str(line_images),
                "--report",
                str(report),
                "--quiet",
            ]
        )
        == 0
    )
    page = (report / "report.html").read_text(encoding="utf-8")
    assert page.endswith("</html>") and "caf\\xe9.png" in page


# -- predict never writes into its inputs, and old and new predictions never mix ---------------------------------------


def test_predict_refuses_its_own_inputs_and_replaces_earlier_predictions_only_with_overwrite(
    trained_run, line_images, tmp_path, capsys
):
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    for path in line_images.iterdir():
        shutil.copy(path, out / "overlays" / path.name)
    inputs = _files(out)
    assert main(["predict", str(trained_run), str(out / "overlays"), "--out", str(out), "--overlays", "--quiet"]) == 2
    assert "contains the input" in _one_line(capsys) and _files(out) == inputs
    assert main(["predict", str(trained_run), str(line_images), "--out", str(line_images / "out"), "--quiet"]) == 2
    assert "lies inside the input" in _one_line(capsys) and not (line_images / "out").exists()
    assert main(["predict", str(trained_run), str(line_images), "--out", str(trained_run), "--quiet"]) == 2
    assert "would overwrite" in _one_line(capsys)

    out = tmp_path / "predicted"
    assert main(["predict", str(trained_run), str(line_images), "--out", str(out), "--overlays", "--quiet"]) == 0
    two = [str(line_images / "img0.png"), str(line_images / "img1.png")]
    assert main(["predict", str(trained_run), *two, "--out", str(out), "--overlays", "--quiet"]) == 2
    assert "earlier predictions" in _one_line(capsys) and len(list((out / "overlays").iterdir())) == 5
    assert main(["predict", str(trained_run), *two, "--out", str(out), "--overlays", "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["img0.png", "img1.png"]


# -- one line and exit code 2 instead of tracebacks; outputs checked before the evaluation -----------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_weights_file_gets_one_line(run_copy, line_images, tmp_path, damage, capsys):
    weights = run_copy / "model.safetensors"
    content = {"truncated": weights.read_bytes()[:1000], "empty": b"", "garbage": b"\x00garbage" * 100}[damage]
    weights.write_bytes(content)
    assert main(["predict", str(run_copy), str(line_images), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "not a readable safetensors file" in _one_line(capsys)


def test_bad_output_places_and_a_garbage_onnx_get_one_line_before_any_work(
    trained_run, tiny_data, line_images, tmp_path, monkeypatch, capsys
):
    import cada.evaluate

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(cada.evaluate, "collect", no_evaluation)
    folder = tmp_path / "folder"
    folder.mkdir()
    evaluate = ["evaluate", str(trained_run), "--data", str(tiny_data), "--quiet"]
    assert main([*evaluate, "--json", str(folder)]) == 2
    assert "is a folder" in _one_line(capsys) and not list(folder.iterdir())
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    assert main([*evaluate, "--report", str(a_file)]) == 2
    assert "is a file" in _one_line(capsys)
    assert main([*evaluate, "--json", str(a_file / "r.json")]) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert main(["predict", str(trained_run), str(line_images), "--out", str(a_file), "--quiet"]) == 2
    assert "is a file" in _one_line(capsys) and a_file.read_text() == "mine"
    with pytest.raises(ValueError, match="is a folder"):  # --debug shows the traceback
        main(["--debug", *evaluate, "--json", str(folder)])

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        writable = os.access(readonly, os.W_OK)  # root writes anywhere: then use a read-only place of the system
        target = readonly if not writable else _unwritable_system_folder()
        assert main([*evaluate, "--plots", str(target / "plots")]) == 2
        assert "cannot write in" in _one_line(capsys)
    finally:
        readonly.chmod(0o755)

    model = tmp_path / "model.onnx"
    model.write_bytes(b"this is not an onnx graph")
    model.with_suffix(".json").write_text(json.dumps({"preprocessing": {"image_size": 64}, "threshold": None}))
    assert main(["predict", str(model), str(line_images), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "not a model onnxruntime can load" in _one_line(capsys)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_earlier_outputs_of_evaluate_and_export_are_replaced_only_with_overwrite(
    trained_run, tiny_data, tmp_path, monkeypatch, capsys
):
    import cada.evaluate

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(cada.evaluate, "collect", no_evaluation)
    results, plots, model = tmp_path / "results.json", tmp_path / "plots", tmp_path / "model.onnx"
    results.write_text("earlier results")
    plots.mkdir()
    (plots / "score_distributions.png").write_bytes(b"earlier figure")
    model.write_bytes(b"earlier model")
    evaluate = ["evaluate", str(trained_run), "--data", str(tiny_data), "--quiet"]
    assert main([*evaluate, "--json", str(results)]) == 2
    message = _one_line(capsys)
    assert "exists" in message and "--overwrite" in message
    assert main([*evaluate, "--plots", str(plots)]) == 2
    assert "is not empty" in _one_line(capsys)
    assert main(["export", str(trained_run), "--out", str(model)]) == 2
    assert "exists" in _one_line(capsys)
    assert results.read_text() == "earlier results" and model.read_bytes() == b"earlier model"
    with pytest.raises(AssertionError, match="before the output was checked"):  # accepted: the evaluation starts
        main([*evaluate, "--json", str(results), "--plots", str(plots), "--overwrite"])


def _unwritable_system_folder() -> Path:
    for candidate in ("/sys", "/proc/self"):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return Path(candidate)
    pytest.skip("running as root with no read-only folder to try")


# -- a signal stops the long passes outside the step loop within a batch -----------------------------------------------


@pytest.mark.parametrize(
    "method, module, phase, resumable",
    [
        ("revdist", "cada.engine.features", "encoding the training images", False),
        ("patchcore", "cada.methods.patchcore", "building the PatchCore memory bank", False),
        ("patchcore", "cada.api", "computing the maps of the training images", True),
        ("revdist-patchcore", "cada.methods.revdist_patchcore", "normalising the RevDist and PatchCore maps", False),
    ],
)
def test_sigterm_stops_a_long_pass_within_a_batch(
    tiny_data, tmp_path, monkeypatch, capsys, method, module, phase, resumable
):
    """SIGTERM arrives during the first batch of the pass (sent from inside it): the pass stops before the next
    batch (the tiny training set has two batches of 16) instead of running to its end."""
    import importlib

    target = importlib.import_module(module)
    original, calls = target.normalize, []

    def normalize_and_signal(images, device=None):
        calls.append(len(images))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the training's handler records it; nothing dies
        return original(images, device)

    monkeypatch.setattr(target, "normalize", normalize_and_signal)
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--method", method)) == 130
    error = capsys.readouterr().err
    assert f"training stopped while {phase}" in error
    assert len(calls) == 1
    if resumable:
        assert "--resume" in error and (run / "resume" / "state.safetensors").is_file()
        monkeypatch.setattr(target, "normalize", original)
        assert main(train_args(tiny_data, run, "--method", method, "--resume")) == 0
        assert (run / "model.safetensors").is_file() and not (run / "resume").exists()
    else:
        assert "nothing to resume" in error


# -- user folders beside and inside a run are never touched (issue 32's probe) -----------------------------------------


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "mine.txt").write_text("user work")
    return path


def test_user_folders_named_like_swap_folders_are_never_touched(tiny_data, run_copy, tmp_path, capsys):
    # Before: the swap recovery deleted .RUN.old/.RUN.new even when train then refused, and with no RUN moved the
    # user's .RUN.old into RUN. Only folders named in the swap's own journal are touched now.
    beside = [_user_folder(tmp_path / ".run.old"), _user_folder(tmp_path / ".run.new")]
    assert main(train_args(tiny_data, run_copy)) == 2  # refused: a run is there
    capsys.readouterr()
    absent = tmp_path / "fresh"
    beside.append(_user_folder(tmp_path / ".fresh.old"))
    assert main(train_args(tiny_data, absent)) == 0
    assert not (absent / "mine.txt").exists() and (absent / "model.safetensors").is_file()
    assert main(train_args(tiny_data, run_copy, "--overwrite")) == 0
    assert all((folder / "mine.txt").read_text() == "user work" for folder in beside)
    assert not list(tmp_path.glob(".*.swap.json")) and not list(tmp_path.glob(".run.*-*"))


def test_a_kill_midway_through_a_swap_is_finished_or_undone_from_its_journal(run_copy, tmp_path):
    from cada.checkpoint import folder_state, recover_swap

    # Killed between the two renames: the old run moved aside, the new one complete beside it.
    new, old = tmp_path / ".run.new-0001", tmp_path / ".run.old-0001"
    shutil.copytree(run_copy, new)
    run_copy.rename(old)
    journal = tmp_path / ".run.swap.json"
    journal.write_text(json.dumps({"format": "cada-swap", "new": new.name, "old": old.name}))
    recover_swap(run_copy)
    assert folder_state(run_copy) == "run" and not new.exists() and not old.exists() and not journal.exists()

    # Killed while the new run was written: the old one stays, the partial one goes.
    _user_folder(new)
    journal.write_text(json.dumps({"format": "cada-swap", "new": new.name, "old": old.name}))
    recover_swap(run_copy)
    assert folder_state(run_copy) == "run" and not new.exists() and not journal.exists()

    # A journal that names folders outside the run's own names is not followed.
    journal.write_text(json.dumps({"format": "cada-swap", "new": "../elsewhere", "old": ".run.old-2"}))
    with pytest.raises(ValueError, match="not a swap journal"):
        recover_swap(run_copy)


def test_only_a_folder_of_a_runs_own_files_is_replaced(tiny_data, trained_run, run_copy, line_images, tmp_path, capsys):
    # A copied config.json does not make a run: before, --overwrite then deleted the user's files beside it.
    copied = _user_folder(tmp_path / "copied")
    shutil.copy(trained_run / "config.json", copied / "config.json")
    assert main(train_args(tiny_data, copied, "--overwrite")) == 2
    assert "is not a cada run" in _one_line(capsys) and (copied / "mine.txt").exists()

    # Predictions written inside a run (accepted) survive a later train --overwrite there: it is refused.
    assert main(["predict", str(run_copy), str(line_images), "--out", str(run_copy / "preds"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(train_args(tiny_data, run_copy, "--overwrite")) == 2
    error = _one_line(capsys)
    assert "1 other entry (preds)" in error and "move them out" in error
    assert (run_copy / "preds" / "predictions.csv").is_file()


def test_out_as_a_symbolic_link_is_refused_before_any_work(tiny_data, run_copy, tmp_path, capsys):
    # Before: the run was written, the command failed anyway ("Cannot call rmtree on a symbolic link"), leaving a
    # .LINK.old link and a resume/ folder in the target, and every later train there failed.
    link = tmp_path / "current"
    link.symlink_to(run_copy)
    before = _files(run_copy)
    assert main(train_args(tiny_data, link, "--overwrite")) == 2
    assert "is a symbolic link" in _one_line(capsys)
    assert link.is_symlink() and _files(run_copy) == before and not (run_copy / "resume").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "run"]
