"""The contract every registered base method keeps (one test per method of the registry, built-ins and plugins):
one optimiser step lowers the loss, a pasted defect scores higher after short training, the same
seed trains the same weights, the output has the documented shapes, and a saved Detector loads bit for bit."""

import pytest
import torch

from cada import Detector
from cada.align import create_aligner
from cada.data.dataset import normalize
from cada.engine import Trainer, make_optimizer
from cada.inference import infer
from cada.methods import METHODS, BaseMethod, create_method

from helpers import assert_save_load_bit_exact, square_means, tiny_preset

# Short training that shows learning at 64 px on the tiny data; a method not listed gets the default.
DEFECT_ITERS = {"revdist": 60, "recontrast": 60, "uniad": 60, "cfa": 30}
DEFAULT_DEFECT_ITERS = 30
# Methods whose map cannot show a defect after a short training, and why.
NO_SHORT_DEFECT = {
    "draem": "its segmentation network needs thousands of steps before its map leaves ~0 "
    "(measured: not after 60); its losses are tested in test_draem.py"
}


def tiny(name: str, iters: int = 2):
    settings = tiny_preset(name, iters)
    if "draem" in settings.method_blocks and name == "draem":
        settings.draem.reconstructive_width = settings.draem.discriminative_width = 4  # fast
    return settings


def build(name: str, settings=None) -> BaseMethod:
    torch.manual_seed(0)
    settings = settings or tiny(name)
    return create_method(name, settings.backbone, settings.image_size, **settings.method_options())


@pytest.mark.parametrize("name", METHODS.names())
def test_one_step_lowers_the_loss_of_a_batch(name, images):
    model, settings = build(name), tiny(name).base.resolved(len(images))
    if not model.trains_by_gradient():
        pytest.skip(f"{name} has no gradient training")
    generator = torch.Generator().manual_seed(0)
    groups, loss_of = model.objective(images, settings, generator, 4.0, Trainer(progress=False))
    optimizer = make_optimizer(groups, settings)
    model.train()
    batch, state = torch.arange(4), generator.get_state()

    def loss() -> torch.Tensor:  # the same batch, the same random draws (synthetic anomalies, noise, dropout)
        generator.set_state(state)
        torch.manual_seed(0)
        return loss_of(0, batch)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < before


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS.names())
def test_a_pasted_defect_scores_higher_after_short_training(name, images):
    if name in NO_SHORT_DEFECT:
        pytest.skip(NO_SHORT_DEFECT[name])
    settings = tiny(name, DEFECT_ITERS.get(name, DEFAULT_DEFECT_ITERS))
    model = build(name, settings)
    model.fit(images, settings.base.resolved(len(images)), torch.Generator().manual_seed(0), progress=False)
    clean_inside, defect_inside = square_means(model, images[:4])
    assert (defect_inside > clean_inside).all()


@pytest.mark.parametrize("name", METHODS.names())
def test_the_same_seed_trains_the_same_weights_and_output_shapes(name, images):
    runs = []
    for _ in range(2):
        model = build(name)
        losses = model.fit(
            images, tiny(name).base.resolved(len(images)), torch.Generator().manual_seed(0), progress=False
        )
        runs.append((losses, model.state_dict()))
    (losses, state), (losses_again, state_again) = runs
    assert losses == losses_again
    assert state.keys() == state_again.keys() and all(torch.equal(v, state_again[k]) for k, v in state.items())
    with torch.inference_mode():  # the shapes of a fitted method's output
        output = model.eval()(normalize(images[:2]))
    assert output.anomaly_map.shape == (2, 64, 64)
    assert output.align_features.dim() == 4 and output.align_features.shape[:2] == (2, model.align_channels)


@pytest.mark.parametrize("name", METHODS.names())
def test_a_saved_detector_loads_bit_exactly(name, tiny_data, images, tmp_path):
    detector = Detector(tiny(name)).fit(tiny_data, progress=False)
    assert detector.settings.aligner.smooth_l1_alpha == detector.method.score_scale
    assert_save_load_bit_exact(detector, tmp_path / "run", images[:6])


@pytest.mark.parametrize("name", METHODS.names())
def test_training_and_inference_keep_every_tensor_on_the_device(name, images):
    """On the meta device (shapes, no data) an operation between a tensor made on the CPU and one on the device
    raises, as it would on a GPU: a hard-coded CPU tensor or a missing `device=` in the training step, the
    memory bank, the inference path or the training-set maps fails here."""
    settings = tiny(name)
    model = build(name, settings).to("meta")
    trainer = Trainer(progress=False, device="meta")
    base = settings.base.resolved(len(images))
    generator = torch.Generator().manual_seed(0)
    if model.trains_by_gradient():
        groups, loss_of = model.objective(images, base, generator, 4.0, trainer)
        model.train()
        loss = loss_of(0, torch.arange(4))
        loss.backward()
        assert loss.device.type == "meta"
        assert any(p.grad is not None for group in groups for p in group["params"])
        assert all(p.grad.device.type == "meta" for group in groups for p in group["params"] if p.grad is not None)
    model.build(images, base, generator, trainer)  # what it keeps beyond weights (PatchCore's bank)
    model.eval()
    aligner = create_aligner("cada", model.align_channels, settings.aligner).to("meta")
    with torch.no_grad():
        result = infer(model, aligner, images[:2], settings)
        maps, u, spread, features = result.maps, result.u, result.spread, result.align_features
        training = model.training_output(normalize(images[:2], "meta"), torch.arange(2, device="meta"))
    assert maps.device.type == u.device.type == spread.device.type == training.anomaly_map.device.type == "meta"
    assert maps.shape == training.anomaly_map.shape == (2, 64, 64) and u.shape == spread.shape == (2,)
    assert features.shape[:2] == (2, model.align_channels)
