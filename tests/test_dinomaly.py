"""Dinomaly's pieces: linear attention, the loose loss's hard mining, the grouping, and a run end to end on the
random ViT-S weights of conftest.py (the method contract test covers training, saving and devices)."""

import pytest
import torch
import torch.nn.functional as F

from cada.cli import main
from cada.methods.dinomaly import LinearAttention, grouped, loose_cosine_loss

from helpers import train_args


def test_linear_attention_is_the_kernel_formula():
    torch.manual_seed(0)
    attention = LinearAttention(dim=8, heads=2)
    x = torch.randn(3, 5, 8)
    q, k, v = attention.qkv(x).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    expected = torch.empty(3, 2, 5, 4)
    for i in range(5):  # token i: sum_j (q_i . k_j) v_j / sum_j (q_i . k_j)
        weights = (q[:, :, i : i + 1] * k).sum(-1, keepdim=True)  # B x heads x tokens x 1
        expected[:, :, i] = (weights * v).sum(2) / weights.sum(2)
    expected = attention.proj(expected.transpose(1, 2).reshape(3, 5, 8))
    assert torch.allclose(attention(x), expected, atol=1e-5)


def test_the_loose_loss_scales_the_gradient_of_well_rebuilt_positions():
    torch.manual_seed(0)
    target = torch.randn(2, 4, 3, 3)
    rebuilt = (target + 0.5 * torch.randn(2, 4, 3, 3)).requires_grad_()
    gradients = []
    for factor in (1.0, 0.1):
        rebuilt.grad = None
        loose_cosine_loss([target], [rebuilt * 1], ratio=0.5, easy_factor=factor).backward()
        gradients.append(rebuilt.grad.clone())
    distance = 1 - F.cosine_similarity(target, rebuilt.detach(), dim=1)
    easy = (distance < distance.flatten().topk(9).values[-1]).unsqueeze(1).expand_as(target)  # 18 x 0.5 = 9 kept
    assert easy.any() and (~easy).any()
    assert torch.allclose(gradients[1][easy], 0.1 * gradients[0][easy])
    assert torch.equal(gradients[1][~easy], gradients[0][~easy])


def test_groups_are_consecutive_runs_of_the_blocks():
    maps = [torch.full((1, 1, 1, 1), float(i)) for i in range(7)]
    assert [g.item() for g in grouped(maps, 2)] == [1.5, 5.0]  # blocks 0-3 and 4-6
    assert [g.item() for g in grouped(maps, 1)] == [3.0]


@pytest.mark.slow
def test_dinomaly_trains_evaluates_and_predicts_from_the_command_line(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, "--method", "dinomaly", iters=3)) == 0
    assert "training dinomaly (vit_small_patch14_dinov2, 64px" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    images = str(tiny_data / "weave" / "test")
    assert main(["predict", str(run), images, "--out", str(tmp_path / "p"), "--quiet"]) == 0
    # timm resizes the ViT's position embeddings with an antialiased bicubic filter that torch's ONNX exporter lacks
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "a dinomaly run cannot be exported" in err and len(err.strip().splitlines()) == 1
