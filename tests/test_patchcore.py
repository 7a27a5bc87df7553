"""PatchCore: greedy coreset against brute force, shapes, determinism, defects, persistence."""

import math

import numpy as np
import pytest
import torch

from cada import Detector
from cada.cli import build_parser, main
from cada.config import BaseTraining, Settings, preset
from cada.config_files import settings_from_options
from cada.data.dataset import load_all, normalize
from cada.data.mvtec import mvtec_samples
from cada.methods.patchcore import PatchCore, PatchCoreSettings, greedy_coreset

from helpers import assert_save_load_bit_exact, paste_square, square_means, tiny_preset, train_args


def tiny_patchcore(**options) -> Settings:
    settings = tiny_preset("patchcore")
    for key, value in options.items():
        setattr(settings.patchcore, key, value)
    return settings


def fitted(images, seed: int = 0, pretrained: bool = False, **options) -> PatchCore:
    torch.manual_seed(0)
    model = PatchCore("efficientnet_lite0", 64, pretrained=pretrained, **options)
    assert model.fit(images, BaseTraining(batch_size=4), torch.Generator().manual_seed(seed), progress=False) == []
    return model


@pytest.fixture(scope="module")
def model(images):
    return fitted(images)


# -- coreset against brute force (the search: test_neighbours.py) ---------------------------------------------
def test_greedy_coreset_adds_the_farthest_point_each_step():
    points = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    chosen = greedy_coreset(points, 30, start=17).tolist()
    distances = torch.cdist(points.double(), points.double())
    expected = [17]
    for _ in range(29):
        expected.append(int(distances[:, expected].amin(dim=1).argmax()))
    assert chosen == expected
    assert len(set(chosen)) == 30
    assert greedy_coreset(points[:5], 10).tolist() == greedy_coreset(points[:5], 5).tolist()  # k capped at n


def test_search_on_an_empty_bank_says_what_to_do():
    with pytest.raises(ValueError, match="fit"):
        PatchCore("efficientnet_lite0", 64, pretrained=False)(torch.randn(1, 3, 64, 64))


# -- the model ------------------------------------------------------------------------------------------
def test_shapes_and_bank_size(model, images):
    n_patches = len(images) * 8 * 8  # one patch per stride-8 position of a 64 px image
    assert model.memory_bank.shape == (round(0.1 * n_patches), 40 + 112)  # Lite0: stride 8 (40) + stride 16 (112)
    assert model.align_channels == 112
    with torch.inference_mode():
        output = model(normalize(images[:3]))
        score = model.reweighted_score(normalize(images[:3]))
    assert output.anomaly_map.shape == (3, 64, 64) and (output.anomaly_map >= 0).all()
    assert output.align_features.shape == (3, 112, 2, 2)  # stride-16 encoder map averaged to stride 32
    assert score.shape == (3,) and (score > 0).all()


@pytest.mark.parametrize("block", [64, 200, 10**6])
def test_bank_rows_are_training_patches_and_blocks_keep_the_ratio(images, block):
    model = fitted(images[:10], coreset_block=block, coreset_ratio=0.25)
    with torch.no_grad():
        features = model.patch_embedding(*model.local_features(normalize(images[:10]))).reshape(-1, 152)
    assert len(model.memory_bank) == round(0.25 * len(features))
    nearest = torch.cdist(model.memory_bank.double(), features.double()).amin(dim=1)
    assert (nearest < 1e-3).all()  # every centre is one of the training patches (up to batch-size rounding)
    assert len(torch.unique(model.memory_bank, dim=0)) == len(model.memory_bank)


def test_training_maps_leave_each_images_own_patches_out(images):
    model = fitted(images[:10], coreset_block=200, coreset_ratio=0.25)
    x = normalize(images[:10])
    with torch.no_grad():
        features = model.patch_embedding(*model.local_features(x))  # 10 x 64 patches x 152
    # each bank row is a patch of the image it is said to come from
    source = features[model.bank_image.long()]  # rows x 64 x 152
    assert ((source - model.memory_bank[:, None]).norm(dim=2).amin(dim=1) < 1e-3).all()
    assert len(set(model.bank_image.tolist())) == 10
    with torch.no_grad():
        seen, left_out = model(x[3:6]).anomaly_map, model.training_output(x[3:6], torch.arange(3, 6)).anomaly_map
    assert (left_out >= seen - 1e-5).all() and (left_out.mean(dim=(1, 2)) > seen.mean(dim=(1, 2))).all()
    for i in range(3, 6):  # the map against the bank without image i's rows
        others = model.memory_bank[model.bank_image != i].double()
        nearest = torch.cdist(features[i].double(), others).amin(dim=1).view(1, 1, 8, 8).float()
        expected = torch.nn.functional.interpolate(nearest, size=(64, 64), mode="bilinear", align_corners=False)
        assert torch.allclose(left_out[i - 3], expected[0, 0], atol=1e-4)


def test_a_bank_saved_without_its_source_images_still_loads(model, images):
    state = {k: v for k, v in model.state_dict().items() if k != "bank_image"}
    old = PatchCore("efficientnet_lite0", 64, pretrained=False)
    old.load_state_dict(state)
    assert (old.bank_image == -1).all() and len(old.bank_image) == len(model.memory_bank)
    x = normalize(images[:2])
    with torch.no_grad():  # nothing to leave out: the training maps are the plain maps
        assert torch.equal(old.training_output(x, torch.arange(2)).anomaly_map, model(x).anomaly_map)


def test_one_block_is_the_plain_greedy_on_projections(images):
    """With a block covering every patch, the bank is the reference's global greedy k-center selection."""
    model = fitted(images[:6], coreset_block=10**6)
    with torch.no_grad():
        features = model.patch_embedding(*model.local_features(normalize(images[:6]))).reshape(-1, 152)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(152, 128, generator=generator) / math.sqrt(128)
    first = int(torch.randint(len(features), (1,), generator=generator))
    chosen = greedy_coreset(features @ projection, round(0.1 * len(features)), start=first)
    assert torch.equal(model.memory_bank, features[chosen])


def test_fit_is_deterministic_with_a_seed(model, images):
    again, other = fitted(images), fitted(images, seed=1)
    assert torch.equal(model.memory_bank, again.memory_bank)
    assert not torch.equal(model.memory_bank, other.memory_bank)
    with torch.inference_mode():
        x = normalize(images[:4])
        assert torch.equal(model(x).anomaly_map, again(x).anomaly_map)
        assert torch.equal(model.reweighted_score(x), again.reweighted_score(x))


def test_reweighted_score_is_the_papers_formula(model, images):
    x = normalize(images[:3])
    with torch.inference_mode():
        score = model.reweighted_score(x)
        embedding = model.patch_embedding(*model.local_features(x))
    bank = model.memory_bank.double()
    for i in range(3):
        distances = torch.cdist(embedding[i].double(), bank)  # patches x bank
        per_patch, nearest = distances.min(dim=1)
        worst = int(per_patch.argmax())
        s_star, m_star = per_patch[worst], nearest[worst]
        support = torch.cdist(bank[m_star : m_star + 1], bank)[0].topk(9, largest=False).indices
        assert m_star in support
        weight = 1 - torch.exp(s_star) / torch.exp(distances[worst, support]).sum()
        assert 0 < weight < 1
        assert torch.allclose(score[i].double(), weight * s_star, rtol=1e-4)


def test_map_is_larger_on_a_pasted_defect(tiny_data, images):
    model = fitted(images, pretrained=True)
    test = [s for s in mvtec_samples(tiny_data, "test") if s.label == 0]
    clean = load_all(test, 64)[0]
    clean_inside, defect_inside = square_means(model, clean)
    with torch.inference_mode():
        clean_score = model.reweighted_score(normalize(clean))
        defect_score = model.reweighted_score(normalize(paste_square(clean)))
    assert (defect_inside > 1.2 * clean_inside).all()
    assert (defect_score > clean_score).all()


# -- settings, Detector, command line ----------------------------------------------------------------------
def test_presets_settings_and_validation():
    paper, cpu = preset("paper", "patchcore"), preset("cpu", "patchcore")
    assert (paper.method, paper.backbone, paper.image_size) == ("patchcore", "wide_resnet50_2", 256)
    assert (cpu.backbone, cpu.image_size) == ("efficientnet_lite0", 256)
    assert cpu.patchcore == PatchCoreSettings(
        coreset_ratio=0.1, projection_dim=128, coreset_block=16384, search_gib=0.5, neighbours=9
    )
    cpu.patchcore.coreset_ratio = 0.05
    assert Settings.from_dict(cpu.to_dict()) == cpu
    old = paper.to_dict()
    del old["patchcore"]  # a run saved before PatchCore existed
    assert Settings.from_dict(old).patchcore == PatchCoreSettings()
    for field, value in [
        ("coreset_ratio", 0.0),
        ("coreset_ratio", 1.5),
        ("projection_dim", 0),
        ("neighbours", 0),
        ("search_gib", 0),
        ("coreset_block", 0),
    ]:
        bad = preset("cpu", "patchcore")
        setattr(bad.patchcore, field, value)
        with pytest.raises(ValueError, match="patchcore"):
            bad.validate()
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--method", "patchcore"])
    assert settings_from_options(vars(args)) == preset("cpu", "patchcore")


def test_detector_save_load_round_trips_bit_exactly(tiny_data, images, tmp_path):
    settings = tiny_patchcore(search_gib=1e-4)  # tiny chunks: the Detector's search goes through many of them
    detector = Detector(settings, pretrained=False).fit(tiny_data, progress=False)
    assert detector.method.options.search_gib == 1e-4  # the Detector hands the method its settings
    assert detector.training_info["base_loss_first_last"] is None  # no gradient training, no loss
    assert detector.settings.aligner.smooth_l1_alpha == 10  # PatchCore's score scale
    loaded = assert_save_load_bit_exact(detector, tmp_path / "run", images[:6])
    assert "method.memory_bank" in loaded._modules().state_dict()
    assert loaded.method.options == detector.method.options


def test_onnx_export_scores_a_batch_as_pytorch(tiny_data, images, tmp_path):
    """The exported search handles any batch (the tracer saw one image): PatchCore's bank and the knn aligner."""
    import onnxruntime

    from cada.export import export_onnx

    settings = tiny_patchcore(search_gib=1e-4)  # several bank chunks in the graph too
    settings.align = "knn"
    detector = Detector(settings, pretrained=False).fit(tiny_data, progress=False)
    session = onnxruntime.InferenceSession(str(export_onnx(detector, tmp_path / "model.onnx")))
    batch = load_all(mvtec_samples(tiny_data, "test"), 64)[0][:5]  # unseen: distances well above 0, where the
    scores, maps, *_ = session.run(None, {"image": batch.numpy()})  # square root would magnify rounding
    expected = detector.predict(batch)
    assert np.abs(scores - expected.scores.numpy()).max() <= 1e-4
    assert np.abs(maps - expected.maps.numpy()).max() <= 1e-4


def test_command_line_trains_and_evaluates_patchcore(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--method", "patchcore", align_iters=5)) == 0  # one pass: no iters
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "training patchcore" in printed and "absolute-unified" in printed
