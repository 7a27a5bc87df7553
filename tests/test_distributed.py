"""Multi-process training and evaluation (2 CPU processes, gloo) and resuming an interrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from cada.cli import main
from cada.engine.log import read_log

from helpers import stop_after_steps, train_args


def _train_args(data, out, *extra):
    # a trained aligner, and checkpoints to resume from
    return train_args(data, out, "--align", "cada", "--checkpoint-every", "3", *extra, iters=4, align_iters=5)


def _assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} of {len(first)} tensors differ, e.g. {different[:3]}"


def _log(run: Path) -> list[tuple]:
    return [(row["stage"], row["step"], row["loss"], row["lr"]) for row in read_log(run / "train_log.csv")]


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tiny_data, tmp_path, monkeypatch, capsys):
    """Stopped in the base stage, then (second run) in the aligner stage; each resumed ends bit-identical."""
    whole = tmp_path / "whole"
    assert main(_train_args(tiny_data, whole)) == 0
    assert not (whole / "resume").exists()  # a finished run keeps no checkpoint
    expected = json.loads((whole / "config.json").read_text())["training"]

    assert main(_train_args(tiny_data, tmp_path / "fresh", "--resume")) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err

    for stop_after, stage in ((2, "base"), (6, "aligner")):  # base has 4 steps: step 6 is the aligner's second
        run = tmp_path / f"stopped-in-{stage}"
        with stop_after_steps(stop_after):  # as if SIGTERM arrived during that step
            assert main(_train_args(tiny_data, run)) == 130
        error = capsys.readouterr().err
        assert "--resume" in error and str(run / "resume") in error
        state = json.loads((run / "resume" / "state.json").read_text())
        assert (state["stage"], state["iteration"]) == (stage, stop_after if stage == "base" else stop_after - 4)
        assert not (run / "model.safetensors").exists()
        if stage == "base":
            assert main([*_train_args(tiny_data, run, "--resume"), "--seed", "1"]) == 2
            error = capsys.readouterr().err
            assert "other settings" in error and "seed: checkpoint 0, now 1" in error
        assert main(_train_args(tiny_data, run, "--resume")) == 0
        assert "resuming from" in capsys.readouterr().out
        _assert_same_tensors(_weights(whole), _weights(run))
        resumed = json.loads((run / "config.json").read_text())["training"]
        for key in ("base_loss_first_last", "aligner_loss_first_last", "mean_image_stats"):
            assert resumed[key] == expected[key]
        assert _log(run) == _log(whole)  # every step once, the same losses and learning rates
        assert not (run / "resume").exists()


@pytest.mark.slow
def test_two_gloo_processes_train_identical_weights_and_evaluate_exactly(tiny_data, tmp_path):
    """torchrun, 2 CPU processes, gloo: DDP training leaves both ranks identical (base and aligner, RevDist and
    ReContrast; the default method's memory bank and normalisers too); distributed evaluation of the saved run
    equals the single-process evaluation exactly."""
    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is required"
    worker = Path(__file__).with_name("ddp_worker.py")
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tiny_data),
        str(tmp_path),
    ]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    assert "DistributedDataParallel over 2 processes (gloo); batch 2 per process, effective batch 4" in finished.stdout
    assert "not scaled with the process count" in finished.stdout
    # what each method keeps beyond the encoder: the trained aligner's head, or the memory bank each rank builds
    kept = {"revdist": "aligner.head.", "recontrast": "aligner.head.", "revdist-patchcore": "method.memory_bank"}
    for method, key_start in kept.items():
        ranks = [load_file(str(tmp_path / f"{method}-rank{r}.safetensors")) for r in (0, 1)]
        _assert_same_tensors(*ranks)
        _assert_same_tensors(ranks[0], _weights(tmp_path / method))  # what rank 0 saved
        assert not (tmp_path / method / "resume").exists()
        assert any(key.startswith(key_start) for key in ranks[0])
    single = tmp_path / "single.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: CPU kernels split their sums by thread count, which moves the last bit
    try:
        assert (
            main(["evaluate", str(tmp_path / "revdist"), "--data", str(tiny_data), "--json", str(single), "--quiet"])
            == 0
        )
        assert (
            main(
                [
                    "predict",
                    str(tmp_path / "revdist"),
                    str(tiny_data),
                    "--out",
                    str(tmp_path / "predicted"),
                    "--batch-size",
                    "8",
                    "--overlays",
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    one, two = (json.loads(path.read_text()) for path in (single, tmp_path / "distributed.json"))
    assert two["meta"]["processes"] == 2 and two["meta"]["n_test_images"] == one["meta"]["n_test_images"] == 28
    assert two["rows"] == one["rows"]
    assert two["per_class"] == one["per_class"]
    assert all(row["aupro"] is not None and row["p_auroc"] is not None for row in one["rows"])
    predicted = [
        json.loads((tmp_path / name / "predictions.json").read_text())
        for name in ("predicted", "predicted-distributed")
    ]
    assert predicted[0]["n_images"] > 28 and predicted[1]["predictions"] == predicted[0]["predictions"]
    overlays = [
        sorted(p.name for p in (tmp_path / name / "overlays").iterdir())
        for name in ("predicted", "predicted-distributed")
    ]
    assert overlays[0] == overlays[1] and len(overlays[0]) == predicted[0]["n_images"]
