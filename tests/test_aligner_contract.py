"""The contract every registered aligner keeps (one test per aligner of the registry), on made-up features of the
channel counts methods give: (u, gamma) per image, finite, with a positive spread; the same seed fits the same
aligner; its state (tensors and config) loads back to the same outputs; the optional whole-image terms come with
the flags that announce them."""

import pytest
import torch

from cada.align import ALIGNERS, create_aligner
from cada.config import AlignTraining

NAMES = ("bottle", "grid", "tile")


def _products(channels: int, n_per_product: int = 12, seed: int = 0):
    """Three products with distinct feature patterns and map statistics (mean, max, std, image score)."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(3, channels, 1, 1, generator=generator) * 2
    labels = torch.arange(3).repeat_interleave(n_per_product)
    features = torch.relu(prototypes[labels] + 0.3 * torch.randn(len(labels), channels, 4, 4, generator=generator))
    levels = torch.tensor([[0.05, 0.3, 0.04, 0.2], [0.2, 0.6, 0.08, 0.5], [0.4, 1.0, 0.12, 0.9]])
    image_stats = levels[labels] * (1 + 0.1 * torch.randn(len(labels), 4, generator=generator).abs())
    return features, image_stats, [NAMES[i] for i in labels]


def _fitted(name: str, channels: int):
    settings = AlignTraining(iters=20, batch_size=8, hidden=16, smooth_l1_alpha=0.1)
    features, image_stats, names = _products(channels)
    torch.manual_seed(0)  # dropout draws from the global generator
    aligner = create_aligner(name, channels, settings)
    aligner.fit(features, image_stats, settings, torch.Generator().manual_seed(0), names, progress=False)
    return aligner.eval(), settings


def _outputs(aligner, features, names) -> list[torch.Tensor]:
    with torch.no_grad():
        u, gamma = aligner.stats(features, names)
        outputs = [u, gamma, aligner.spread(u, gamma)]
        for extra in (aligner.score_offset(features), aligner.nearest_distance(features)):
            if extra is not None:
                outputs.append(extra)
    return outputs


@pytest.mark.parametrize("channels", [16, 160])
@pytest.mark.parametrize("name", ALIGNERS.names())
def test_an_aligner_gives_finite_statistics_with_a_positive_spread_per_image(name, channels):
    aligner, _ = _fitted(name, channels)
    features, _, names = _products(channels, n_per_product=4, seed=1)
    u, gamma, spread, *extras = _outputs(aligner, features, names)
    assert u.shape == gamma.shape == spread.shape == (len(features),)
    assert torch.isfinite(u).all() and torch.isfinite(gamma).all() and (spread > 0).all()
    assert (aligner.score_offset(features) is not None) == aligner.has_score_offset
    assert (aligner.nearest_distance(features) is not None) == (aligner.unfamiliar_reference is not None)
    for extra in extras:
        assert extra.shape == (len(features),) and torch.isfinite(extra).all()


@pytest.mark.parametrize("name", ALIGNERS.names())
def test_the_same_seed_fits_the_same_aligner_and_its_state_loads_back(name):
    aligner, settings = _fitted(name, 16)
    again, _ = _fitted(name, 16)
    features, _, names = _products(16, n_per_product=4, seed=1)
    expected = _outputs(aligner, features, names)
    for a, b in zip(expected, _outputs(again, features, names), strict=True):
        assert torch.equal(a, b)
    fresh = create_aligner(name, 16, settings)
    fresh.load_config_state(aligner.config_state())
    fresh.load_state_dict(aligner.state_dict(), strict=True)
    for a, b in zip(expected, _outputs(fresh.eval(), features, names), strict=True):
        assert torch.equal(a, b)
