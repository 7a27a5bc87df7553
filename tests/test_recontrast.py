"""ReContrast: two encoders, crossed pairs, hard-mined cosine loss, its schedule, and that it sees defects."""

import pytest
import torch
from torch import nn

from cada import Detector
from cada.config import Settings, preset
from cada.data.dataset import normalize
from cada.engine import Trainer, make_optimizer
from cada.methods.recontrast import ReContrast, hard_mined_cosine_loss, hard_mining_alpha

from helpers import assert_save_load_bit_exact, paste_square, square_means, tiny_preset


@pytest.fixture(scope="module")
def trained(images):
    """60 iterations of the cpu preset's schedule (alpha ramp, LR drop at 48) on tiny data."""
    torch.manual_seed(0)
    model = ReContrast("efficientnet_lite0", 64)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.trainable_encoder.state_dict().items()}
    losses = model.fit(images, tiny_preset("recontrast", 60).base, torch.Generator().manual_seed(0), progress=False)
    return model, losses, encoder_before, trainable_before


def test_shapes_heads_and_pairs():
    model = ReContrast("efficientnet_lite0", 64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        targets, rebuilt, embedding = model.pairs(x)
        output = model(x)
    assert len(targets) == len(rebuilt) == 6
    assert [t.shape for t in targets] == [r.shape for r in rebuilt]
    assert [t.shape[1] for t in targets] == [24, 40, 112] * 2
    assert [len(h) for h in model.heads] == [3, 3] and all(c.kernel_size == (1, 1) for h in model.heads for c in h)
    assert any(isinstance(m, nn.GELU) for m in model.decoder.modules())
    assert output.anomaly_map.shape == (2, 64, 64)
    assert output.align_features.shape == (2, 224, 2, 2) and model.align_channels == 224
    assert torch.equal(output.align_features, embedding)
    assert (output.anomaly_map >= 0).all() and (output.anomaly_map <= 2).all()  # mean of 1 - cosine


def test_crossed_pairing_targets_are_frozen_then_trainable_features():
    model = ReContrast("efficientnet_lite0", 64).eval()
    with torch.no_grad():  # make the two encoders differ so the order is visible
        next(model.trainable_encoder.parameters()).mul_(1.5)
        x = torch.randn(1, 3, 64, 64)
        targets, _, _ = model.pairs(x)
        frozen, adapted = model.encoder(x), model.trainable_encoder(x)
    assert all(torch.equal(t, f) for t, f in zip(targets[:3], frozen))
    assert all(torch.equal(t, a) for t, a in zip(targets[3:], adapted))


def test_encoders_frozen_and_trainable_both_stay_in_eval_mode():
    model = ReContrast("efficientnet_lite0", 64)
    model.train()
    assert not model.encoder.training and not model.trainable_encoder.training  # BN keeps ImageNet statistics
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.trainable_encoder.parameters())
    for a, b in zip(model.encoder.state_dict().values(), model.trainable_encoder.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # an identical but separate copy


def test_training_lowers_the_loss_and_adapts_only_the_trainable_encoder(trained):
    model, losses, encoder_before, trainable_before = trained
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert all(torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items())
    changed = [not torch.equal(trainable_before[k], v) for k, v in model.trainable_encoder.state_dict().items()]
    assert any(changed)


def test_map_is_larger_on_a_pasted_defect_after_short_training(trained, images):
    model = trained[0]
    clean_inside, defect_inside = square_means(model, images[:4])
    with torch.inference_mode():
        defective = normalize(paste_square(images[:4]))
        assert torch.equal(model(defective).anomaly_map, model(defective).anomaly_map)  # deterministic in eval mode
    assert (defect_inside > clean_inside + 0.05).all()


def test_gradient_stop_hook_zeroes_exactly_the_easy_positions():
    torch.manual_seed(0)
    target = torch.randn(2, 8, 6, 6)
    leaf = torch.randn(2, 8, 6, 6, requires_grad=True)
    alpha = 0.5
    hard_mined_cosine_loss([target], [leaf * 1], alpha, factor=0.0).backward()
    distance = 1 - torch.nn.functional.cosine_similarity(target, leaf.detach(), dim=1)
    easy = distance < distance.mean() + alpha * distance.std()
    assert 0 < easy.sum() < easy.numel()
    gradient_norm = leaf.grad.abs().sum(dim=1)
    assert (gradient_norm[easy] == 0).all()
    assert (gradient_norm[~easy] > 0).all()

    plain = leaf.detach().clone().requires_grad_(True)  # factor 1: the plain flattened cosine gradient
    hard_mined_cosine_loss([target], [plain * 1], alpha, factor=1.0).backward()
    expected = leaf.detach().clone().requires_grad_(True)
    (1 - torch.nn.functional.cosine_similarity(target.flatten(1), expected.flatten(1))).mean().backward()
    assert torch.allclose(plain.grad, expected.grad)


def test_alpha_ramps_from_minus_three_to_one_over_the_first_tenth():
    assert hard_mining_alpha(0, 1000) == -3
    assert hard_mining_alpha(50, 1000) == pytest.approx(-1)
    assert hard_mining_alpha(100, 1000) == 1 and hard_mining_alpha(999, 1000) == 1


def test_learning_rates_per_group_and_the_drop_at_eighty_percent():
    settings = preset("cpu", "recontrast").base
    settings.iters, settings.batch_size = 10, 2
    decoder, encoder = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([{"params": [decoder]}, {"params": [encoder], "lr": settings.encoder_lr}], settings)
    assert optimizer.defaults["amsgrad"] and optimizer.defaults["eps"] == 1e-10
    seen = []

    def loss_of(iteration, batch):
        seen.append([group["lr"] for group in optimizer.param_groups])
        return (decoder.sum() + encoder.sum()) ** 2

    Trainer(progress=False).run("test", 4, settings, optimizer, torch.Generator().manual_seed(0), loss_of)
    assert seen[:8] == [[2e-3, 1e-5]] * 8
    assert seen[8:] == [pytest.approx([4e-4, 2e-6])] * 2


def test_presets():
    paper = preset("paper", "recontrast")
    assert (paper.backbone, paper.image_size, paper.base.iters, paper.base.lr) == ("wide_resnet50_2", 256, 5000, 2e-3)
    base = paper.base
    assert (base.amsgrad, base.eps, base.lr_drop_at, base.encoder_lr) == (True, 1e-10, 0.8, 1e-5)
    cpu = preset("cpu", "recontrast")
    assert (cpu.backbone, cpu.image_size, cpu.base.iters) == ("efficientnet_lite0", 256, preset("cpu").base.iters)
    assert Settings.from_dict(cpu.to_dict()) == cpu


def test_detector_save_load_round_trips_bit_exactly(tiny_data, images, tmp_path):
    detector = Detector(tiny_preset("recontrast", 3)).fit(tiny_data, progress=False)
    assert detector.settings.aligner.smooth_l1_alpha == 0.1  # the method's score scale
    loaded = assert_save_load_bit_exact(detector, tmp_path / "run", images[:6])
    assert any(k.startswith("method.trainable_encoder.") for k in loaded._modules().state_dict())
