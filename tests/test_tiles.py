"""Tiling (`--tile N --tile-overlap F`): tiles cut and stitched exactly, results combined per image, every path."""

import copy
import json

import numpy as np
import pytest
import torch

from cada import Detector
from cada.cli import main
from cada.config import Settings
from cada.data.dataset import load_all
from cada.data.mvtec import mvtec_samples
from cada.scoring import align
from cada.tiles import cut, input_size, stitch, stride_of

from helpers import train_args

TILE, OVERLAP = 2, 0.25  # at 64 px: tiles 48 px apart, on a 112 px square


def test_tiles_cover_the_square_and_stitch_back():
    assert (stride_of(64, OVERLAP), input_size(64, TILE, OVERLAP)) == (48, 112)
    assert input_size(64, 3, 0.0) == 192 and input_size(64, 1, 0.5) == 64
    images = torch.rand(2, 3, 112, 112)
    pieces = cut(images, 64, TILE, OVERLAP)
    assert pieces.shape == (8, 3, 64, 64)
    assert torch.equal(pieces[1], images[0, :, :64, 48:]) and torch.equal(pieces[6], images[1, :, 48:, :64])
    assert torch.equal(stitch(pieces[:, 0], 64, TILE, OVERLAP), images[:, 0])  # equal values where tiles overlap
    marked = torch.zeros(4, 64, 64)
    marked[3] = 1  # the bottom-right tile: the largest value wins where it overlaps the others
    stitched = stitch(marked, 64, TILE, OVERLAP)[0]
    assert stitched[48:, 48:].eq(1).all() and stitched[:48].eq(0).all() and stitched[:, :48].eq(0).all()


@pytest.fixture(scope="module")
def tiled_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("tiled") / "run"
    extra = ("--tile", str(TILE), "--tile-overlap", str(OVERLAP), "--holdout", "0.2")
    assert main(train_args(tiny_data, run, *extra, iters=3, align_iters=5)) == 0
    return run


def test_an_image_scores_as_its_most_anomalous_tile(tiled_run, tiny_data):
    """The tiled result against the same networks scoring the tiles one by one as images of their own."""
    detector = Detector.load(tiled_run)
    settings = detector.settings
    assert (settings.tile, settings.tile_overlap, settings.input_size) == (TILE, OVERLAP, 112)
    images = load_all(mvtec_samples(tiny_data, "test"), 112)[0]
    result = detector.infer(images)
    assert result.maps.shape == result.aligned_maps.shape == (len(images), 112, 112)
    per_tile = copy.copy(detector)
    per_tile.settings = copy.deepcopy(settings)
    per_tile.settings.tile, per_tile.settings.tile_overlap = 1, 0.0
    tiles = per_tile.infer(cut(images, 64, TILE, OVERLAP))
    aligned = tiles.aligned_scores.view(-1, 4)
    best = aligned.argmax(dim=1)
    assert torch.allclose(result.aligned_scores, aligned.max(dim=1).values, atol=1e-5)
    assert torch.allclose(result.base_scores, tiles.base_scores.view(-1, 4).max(dim=1).values, atol=1e-5)
    assert torch.allclose(result.u, tiles.u.view(-1, 4)[torch.arange(len(images)), best], atol=1e-5)
    assert torch.allclose(result.spread, tiles.spread.view(-1, 4)[torch.arange(len(images)), best], atol=1e-5)
    # the top-left 48 px belong to the first tile alone: its own aligned map there
    first = align(tiles.maps, tiles.u, tiles.spread).view(-1, 4, 64, 64)[:, 0]
    assert torch.allclose(result.aligned_maps[:, :48, :48], first[:, :48, :48], atol=1e-5)


def test_the_tiled_run_trains_on_tiles_and_calibrates_per_image(tiled_run):
    config = json.loads((tiled_run / "config.json").read_text())
    assert config["settings"]["tile"] == TILE and config["settings"]["tile_overlap"] == OVERLAP
    assert config["training"]["n_images"] == 20  # images; the base saw their 80 tiles
    assert config["calibration"]["n_normal"] == 4  # the held-out images, each scored once


@pytest.mark.slow
def test_predict_evaluate_and_exports_agree(tiled_run, tiny_data, tmp_path):
    folder = tiny_data / "washer" / "test"
    assert main(["predict", str(tiled_run), str(folder), "--out", str(tmp_path / "torch"), "--quiet"]) == 0
    expected = json.loads((tmp_path / "torch" / "predictions.json").read_text())["predictions"]
    for kind in ("resized", "raw"):
        model = tmp_path / f"{kind}.onnx"
        assert main(["export", str(tiled_run), "--out", str(model), "--input", kind]) == 0
        assert "2 x 2 tiles" in json.loads(model.with_suffix(".json").read_text())["preprocessing"]["tiles"]
        assert main(["predict", str(model), str(folder), "--out", str(tmp_path / kind), "--quiet"]) == 0
        rows = json.loads((tmp_path / kind / "predictions.json").read_text())["predictions"]
        for column in ("score", "u", "spread", "score_offset", "nearest_distance"):
            assert np.allclose([r[column] for r in rows], [r[column] for r in expected], atol=1e-4), column
    out = tmp_path / "results.json"
    args = ["evaluate", str(tiled_run), "--data", str(tiny_data), "--json", str(out), "--quiet"]
    assert main([*args, "--pixel-resolution", "original", "--report", str(tmp_path / "report")]) == 0
    pooled = json.loads(out.read_text())["rows"]
    assert all(0 <= row["i_auroc"] <= 1 for row in pooled if row.get("i_auroc") is not None)


def test_ablations_of_tiled_runs_are_refused_in_one_line(tiled_run, tiny_data, tmp_path, capsys):
    assert main(["ablate", "--data", str(tiny_data), "--out", str(tmp_path / "a"), "--run", str(tiled_run)]) == 2
    assert "tiled run" in capsys.readouterr().err


def test_bad_tile_settings_are_refused():
    with pytest.raises(ValueError, match="tile_overlap .* set tile above 1"):
        Settings(tile_overlap=0.5).validate()
    with pytest.raises(ValueError, match="tile"):
        Settings(tile=0).validate()
    with pytest.raises(ValueError, match="tile_overlap"):
        Settings(tile=2, tile_overlap=0.9).validate()
