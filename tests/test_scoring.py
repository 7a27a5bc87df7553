import numpy as np
import pytest
import torch
from scipy import ndimage

from cada.scoring import align, gaussian_kernel, image_score, smooth


def test_smooth_matches_scipy_gaussian_away_from_the_border():
    maps = torch.rand(2, 80, 80, generator=torch.Generator().manual_seed(0))
    ours = smooth(maps, 4.0).numpy()
    reference = np.stack([ndimage.gaussian_filter(m, sigma=4.0, mode="mirror") for m in maps.numpy()])
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_smooth_keeps_constants_and_commutes_with_alignment():
    maps = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    constant = torch.full((1, 64, 64), 0.7)
    assert torch.allclose(smooth(constant, 4.0), constant, atol=1e-6)
    u, spread = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 1.0, 2.0])
    assert torch.allclose(smooth(align(maps, u, spread), 4.0), align(smooth(maps, 4.0), u, spread), atol=1e-5)


def test_gaussian_kernel_sums_to_one_with_radius_four_sigma():
    kernel = gaussian_kernel(4.0)
    assert len(kernel) == 33
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_image_score_is_mean_of_top_fraction():
    maps = torch.zeros(2, 10, 10)
    maps[0].view(-1)[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert image_score(maps, 0.03).tolist() == pytest.approx([4.0, 0.0])
    assert image_score(maps, 0.001).tolist() == pytest.approx([5.0, 0.0])  # at least one pixel


def test_aligned_score_equals_score_of_aligned_map():
    maps = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(2))
    u, spread = torch.rand(4), torch.rand(4) + 0.1
    direct = image_score(align(maps, u, spread), 0.01)
    assert torch.allclose(direct, align(image_score(maps, 0.01), u, spread), atol=1e-6)
