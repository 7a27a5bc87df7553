"""UniAD: the neighbour mask, shapes, jittered training, and that it sees defects."""

import pytest
import torch

from cada import Detector
from cada.backbones import WeightsNotFoundError
from cada.cli import build_parser
from cada.config import Settings, preset
from cada.config_files import settings_from_options
from cada.methods.uniad import DecoderLayer, EncoderLayer, UniAD, fitting_window, neighbour_mask

from helpers import assert_save_load_bit_exact, square_means, tiny_preset


@pytest.fixture(scope="module")
def trained(images):
    torch.manual_seed(0)
    model = UniAD("efficientnet_lite0", 64)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    settings = tiny_preset("uniad", 60).base
    settings.lr = 1e-3  # a few dozen steps must show learning; the preset's 3e-4 is for hundreds
    losses = model.fit(images, settings, torch.Generator().manual_seed(0), progress=False)
    return model, losses, encoder_before


def test_neighbour_mask_forbids_exactly_the_7x7_window():
    grid = 14
    mask = neighbour_mask(grid, 7).view(grid, grid, grid, grid)
    assert mask[7, 7].sum() == 49 and mask[7, 7, 4:11, 4:11].all()  # itself included
    assert mask[0, 0].sum() == 16 and mask[0, 0, :4, :4].all()  # clipped at the border
    assert not mask[7, 7, 3].any() and not mask[7, 7, :, 11].any()


def test_attention_weights_on_each_tokens_window_are_exactly_zero():
    torch.manual_seed(0)
    model = UniAD("efficientnet_lite0", 224, pretrained=False).eval()
    transformer = model.transformer
    assert (transformer.grid, transformer.window) == (14, 7)
    x = torch.randn(2, 196, 256)
    layers = [
        transformer.encoder_layers[0].attention,
        transformer.decoder_layers[0].self_attention,
        transformer.decoder_layers[0].cross_attention,
    ]
    for attention in layers:
        _, weights = attention(x, x, x, attn_mask=transformer.mask, need_weights=True, average_attn_weights=False)
        assert (weights[:, :, transformer.mask] == 0).all()
        assert (weights[:, :, ~transformer.mask] > 0).all()
        assert torch.allclose(weights.sum(dim=-1), torch.ones(()))


def test_layers_ignore_the_neighbourhood_they_may_not_attend_to():
    """Behaviour, not just the mask: changing a token's neighbours leaves its output alone; a far token does not."""
    torch.manual_seed(0)
    grid, window, token = 8, 5, 3 * 8 + 3
    mask = neighbour_mask(grid, window)
    pos = torch.randn(1, grid * grid, 32)
    encoder = EncoderLayer(32, 4, 64, 0.1).eval()
    decoder = DecoderLayer(32, 4, 64, 0.1, grid * grid).eval()
    torch.nn.init.normal_(decoder.queries)
    x = torch.randn(1, grid * grid, 32)
    neighbours = mask[token].clone()
    neighbours[token] = False  # its own input also reaches it through the residual path of the encoder layer
    near, far = x.clone(), x.clone()
    near[0, neighbours] += 5 * torch.randn(int(neighbours.sum()), 32)
    far[0, ~mask[token]] += 5 * torch.randn(int((~mask[token]).sum()), 32)
    with torch.no_grad():
        for layer in (encoder, decoder):
            out, out_near, out_far = (layer(v, pos, mask)[0, token] for v in (x, near, far))
            assert torch.allclose(out, out_near, atol=1e-5)
            assert not torch.allclose(out, out_far, atol=1e-3)
        # the decoder reads the previous output only through cross-attention: the token itself is masked too
        own = x.clone()
        own[0, token] += 5
        assert torch.allclose(decoder(x, pos, mask)[0, token], decoder(own, pos, mask)[0, token], atol=1e-5)


def test_window_shrinks_only_on_grids_too_small_for_it():
    assert [fitting_window(g) for g in (4, 5, 6, 7, 8, 14, 16)] == [3, 3, 5, 5, 7, 7, 7]


def test_shapes_and_deterministic_eval():
    model = UniAD("efficientnet_lite0", 64).eval()
    assert model.encoder.channels == (16, 24, 40, 112) and model.align_channels == 192
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        output, again = model(x), model(x)
    assert output.anomaly_map.shape == (2, 64, 64) and (output.anomaly_map >= 0).all()
    assert output.align_features.shape == (2, 192, 4, 4)  # concatenated encoder features at the stride-16 grid
    assert torch.equal(output.anomaly_map, again.anomaly_map)  # no jitter, no dropout


def test_training_lowers_the_loss_and_leaves_the_encoder_alone(trained):
    model, losses, encoder_before = trained
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    assert all(torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items())


def test_map_is_larger_on_a_pasted_defect_after_short_training(trained, images):
    model = trained[0]
    clean_inside, defect_inside = square_means(model, images[:4])
    assert (defect_inside > 1.02 * clean_inside).all()


def test_presets_and_the_command_line_choose_uniad_settings(tmp_path, monkeypatch):
    paper = preset("paper", "uniad")
    assert (paper.backbone, paper.image_size) == ("efficientnet_b4", 224)
    assert (paper.base.batch_size, paper.base.iters) == (64, 50_000)
    assert (paper.base.lr, paper.base.weight_decay, paper.aligner.iters) == (3e-4, 1e-4, 20_000)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no B4 weights anywhere: a clear error naming them
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(WeightsNotFoundError, match="efficientnet_b4"):
        Detector(paper)
    assert Detector(paper, pretrained=False).method.align_channels == 272  # UniAD's 24 + 32 + 56 + 160
    cpu = preset("cpu", "uniad")
    assert (cpu.backbone, cpu.image_size, cpu.base.lr) == ("efficientnet_lite0", 224, 3e-4)
    assert Settings.from_dict(cpu.to_dict()) == cpu
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--method", "uniad"])
    assert settings_from_options(vars(args)) == cpu


def test_detector_save_load_round_trips_bit_exactly(tiny_data, images, tmp_path):
    detector = Detector(tiny_preset("uniad", 3)).fit(tiny_data, progress=False)
    assert detector.settings.aligner.smooth_l1_alpha == 10  # the method's score scale (paper: 10 for UniAD)
    loaded = assert_save_load_bit_exact(detector, tmp_path / "run", images[:6])
    assert torch.equal(loaded.method.transformer.mask, detector.method.transformer.mask)
