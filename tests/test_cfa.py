"""CFA: descriptor and memory bank, soft-boundary loss, shapes, reproducible training, defects, save/load, CLI."""

import pytest
import torch

from cada import Detector
from cada.cli import build_parser, main
from cada.config import Settings, preset
from cada.config_files import settings_from_options
from cada.data.dataset import normalize
from cada.methods.cfa import CFA, CoordConv

from helpers import assert_save_load_bit_exact, square_means, tiny_preset, train_args


def fitted(images, iters: int, seed: int = 0) -> tuple[CFA, list[float]]:
    torch.manual_seed(0)
    model = CFA("efficientnet_lite0", 64)
    losses = model.fit(images, tiny_preset("cfa", iters).base, torch.Generator().manual_seed(seed), progress=False)
    return model, losses


@pytest.fixture(scope="module")
def trained(images):
    return fitted(images, 30)


def test_shapes_and_memory_bank_size():
    model = CFA("efficientnet_lite0", 64).eval()
    assert model.encoder.channels == (24, 40, 112) and model.align_channels == 112
    assert model.centroids.shape == (176, 16 * 16)  # one centroid per stride-4 position, sized by image_size
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        output = model(x)
    assert output.anomaly_map.shape == (2, 64, 64) and (output.anomaly_map >= 0).all()
    assert output.align_features.shape == (2, 112, 4, 4)
    assert CFA("efficientnet_lite0", 64, gamma_d=2).centroids.shape == (88, 256)


def test_coordconv_sees_the_position():
    conv = CoordConv(1, 1)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 1] = 1  # the x coordinate channel
        conv.conv.bias.zero_()
        out = conv(torch.zeros(1, 1, 4, 5))[0, 0]
    assert torch.allclose(out[0], torch.linspace(-1, 1, 5)) and torch.equal(out[:, 0], out[:, 0].new_full((4,), -1.0))


def test_nearest_distances_match_the_full_distance_matrix_with_gradients():
    torch.manual_seed(0)
    model = CFA("efficientnet_lite0", 64, pretrained=False)
    model.centroids.copy_(torch.randn_like(model.centroids))
    descriptors = torch.randn(5, 7, model.centroids.shape[0], requires_grad=True)
    chosen = model.nearest_squared_distances(descriptors, 4)
    full = torch.cdist(descriptors, model.centroids.t().unsqueeze(0)).pow(2).topk(4, largest=False).values
    assert torch.allclose(chosen, full, rtol=1e-4, atol=1e-3)
    (grad,) = torch.autograd.grad(chosen.sum(), descriptors)
    (grad_full,) = torch.autograd.grad(full.sum(), descriptors)
    assert torch.allclose(grad, grad_full, rtol=1e-3, atol=1e-3)
    with torch.no_grad():  # inference: the search's own distances, no recomputation
        assert torch.allclose(model.nearest_squared_distances(descriptors, 4), full, rtol=1e-4, atol=1e-3)


def test_memory_bank_is_the_mean_initial_descriptor(images):
    torch.manual_seed(0)
    model = CFA("efficientnet_lite0", 64)
    with torch.no_grad():
        expected = model.describe(model.encoder(normalize(images))).flatten(2).mean(dim=0)
    model.fit(images, tiny_preset("cfa", 1).base, torch.Generator().manual_seed(0), progress=False)
    assert torch.allclose(model.centroids, expected, atol=1e-4)


def test_training_lowers_the_loss_and_leaves_the_encoder_alone(trained):
    model, losses = trained
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    fresh = CFA("efficientnet_lite0", 64).encoder.state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in model.encoder.state_dict().items())


def test_map_is_larger_on_a_pasted_defect_after_short_training(trained, images):
    model = trained[0]
    clean_inside, defect_inside = square_means(model, images[:4])
    assert (defect_inside > 1.5 * clean_inside).all()


def test_presets_and_the_command_line_choose_cfa_settings():
    paper = preset("paper", "cfa")
    assert (paper.backbone, paper.image_size) == ("wide_resnet50_2", 256)
    assert (paper.base.lr, paper.base.weight_decay, paper.base.amsgrad, paper.base.batch_size) == (1e-3, 5e-4, True, 4)
    assert (paper.cfa.gamma_d, paper.cfa.k, paper.cfa.j) == (1, 3, 3)
    assert CFA("wide_resnet50_2", 256, pretrained=False).centroids.shape == (1792, 64 * 64)  # CFA's 1792-d bank
    cpu = preset("cpu", "cfa")
    assert cpu.backbone == "efficientnet_lite0"
    for settings in (paper, cpu):
        assert Settings.from_dict(settings.to_dict()) == settings.validate()
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--method", "cfa"])
    assert settings_from_options(vars(args)) == cpu


def test_detector_save_load_round_trips_bit_exactly(tiny_data, images, tmp_path):
    detector = Detector(tiny_preset("cfa", 2)).fit(tiny_data, progress=False)
    assert detector.settings.aligner.smooth_l1_alpha == 1.0
    assert detector.method.centroids.abs().sum() > 0
    loaded = assert_save_load_bit_exact(detector, tmp_path / "run", images[:6])
    assert "method.centroids" in loaded._modules().state_dict()


def test_cli_trains_cfa(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--method", "cfa", iters=1, align_iters=2)) == 0
    assert "training cfa" in capsys.readouterr().out
    assert Detector.load(run).settings.method == "cfa"
