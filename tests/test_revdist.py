"""Reverse Distillation: structure, shapes, training, and that it sees defects."""

import pytest
import torch
from torch import nn

from cada.data.dataset import load_all
from cada.data.mvtec import mvtec_samples
from cada.methods.revdist import Bottleneck, RevDist, flattened_cosine_loss

from helpers import square_means


def test_wide_resnet_gives_exactly_the_rd4ad_bottleneck_and_decoder():
    model = RevDist("wide_resnet50_2", 64, pretrained=False)
    assert model.encoder.channels == (256, 512, 1024)
    assert [len(stage) for stage in model.decoder.stages] == [3, 4, 6]
    assert len(model.bottleneck.embed) == 3 and model.bottleneck.out_channels == 2048
    first = model.bottleneck.embed[0]
    assert first.body[0].in_channels == 3072 and first.body[3].out_channels == 1024  # width 512 * 2
    assert isinstance(model.decoder.stages[0][0].body[3], nn.ConvTranspose2d)  # upsampling, not strided conv
    assert any(isinstance(m, nn.GELU) for m in model.decoder.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.decoder.modules())
    with torch.inference_mode():
        output = model(torch.randn(1, 3, 64, 64))
    assert output.anomaly_map.shape == (1, 64, 64)
    assert output.align_features.shape == (1, 2048, 2, 2)


def test_lite0_shapes_and_decoder_mirrors_encoder():
    model = RevDist("efficientnet_lite0", 64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        encoded = model.encoder(x)
        _, decoded = model.reconstruct(encoded)
        output = model(x)
    assert [d.shape for d in decoded] == [e.shape for e in encoded]
    assert output.anomaly_map.shape == (2, 64, 64)
    assert output.align_features.shape == (2, 224, 2, 2)
    assert (output.anomaly_map >= 0).all() and (output.anomaly_map <= 2).all()  # 1 - cosine


def test_only_bottleneck_and_decoder_train():
    model = RevDist("efficientnet_lite0", 64)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) not in trainable and not p.requires_grad for p in model.encoder.parameters())
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}


def test_training_lowers_the_loss_and_leaves_the_encoder_alone(tiny_data, tiny_settings):
    torch.manual_seed(0)
    images, _ = load_all(mvtec_samples(tiny_data, "train"), 64)
    model = RevDist("efficientnet_lite0", 64)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    settings = tiny_settings().base
    settings.iters = 30
    losses = model.fit(images, settings, torch.Generator().manual_seed(0), progress=False)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert all(torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items())


def test_recomputing_features_trains_like_the_cache(tiny_data, tiny_settings):
    images, _ = load_all(mvtec_samples(tiny_data, "train"), 64)
    runs = []
    for cache_gib in (4.0, 0.0):
        torch.manual_seed(0)
        model = RevDist("efficientnet_lite0", 64)
        runs.append(model.fit(images, tiny_settings().base, torch.Generator().manual_seed(0), False, cache_gib))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_map_is_larger_on_a_pasted_defect_after_short_training(tiny_data, tiny_settings):
    torch.manual_seed(0)
    images, _ = load_all(mvtec_samples(tiny_data, "train"), 64)
    model = RevDist("efficientnet_lite0", 64)
    settings = tiny_settings().base
    settings.iters = 60
    model.fit(images, settings, torch.Generator().manual_seed(0), progress=False)
    clean_inside, defect_inside = square_means(model, images[:4])
    assert (defect_inside > clean_inside + 0.05).all()


def test_flattened_cosine_loss_is_zero_for_identical_features():
    features = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    assert flattened_cosine_loss(features, features).item() == pytest.approx(0.0, abs=1e-6)
    assert flattened_cosine_loss(features, [-f for f in features]).item() == pytest.approx(4.0, abs=1e-5)


def test_upsampling_bottleneck_doubles_resolution():
    block = Bottleneck(64, 8, stride=2, upsample=True)
    assert block(torch.randn(1, 64, 4, 4)).shape == (1, 32, 8, 8)
