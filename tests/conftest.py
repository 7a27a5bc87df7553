"""Shared fixtures: tiny synthetic data made once per test session."""

import pytest
import torch

from cada.cli import main

from helpers import train_args

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 synthetic classes at 64 px: enough for a few training steps and every metric."""
    from cada.data.synthetic import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("synthetic"), n_train=6, n_test_good=3, n_test_defect=4, image_size=64, seed=0
    )


@pytest.fixture(scope="session")
def images(tiny_data):
    """The training images of `tiny_data`, uint8 N x 3 x 64 x 64."""
    from cada.data.dataset import load_all
    from cada.data.mvtec import mvtec_samples

    return load_all(mvtec_samples(tiny_data, "train"), 64)[0]


@pytest.fixture(scope="session")
def tiny_settings():
    """`tiny_preset` of RevDist (the fastest to train; revdist-patchcore has its own tests), with `changes`."""
    from helpers import tiny_preset

    def make(**changes):
        settings = tiny_preset("revdist")
        for key, value in changes.items():
            setattr(settings, key, value)
        return settings

    return make


@pytest.fixture(autouse=True, scope="session")
def _image_cache_in_tmp(tmp_path_factory):
    """Tests never write into the user's image cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CADA_CACHE_DIR", str(tmp_path_factory.mktemp("image-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def calibrated_run(tiny_data, tmp_path_factory):
    """A tiny trained run with its threshold calibrated at 10% FPR on the training normals. Tests read it;
    one that changes a run works on a copy."""
    run = tmp_path_factory.mktemp("calibrated") / "run"
    assert main(train_args(tiny_data, run, iters=3, align_iters=5)) == 0
    normal = [str(tiny_data / name / "train" / "good") for name in ("weave", "marble", "washer", "circuit")]
    assert main(["calibrate", str(run), "--normal", *normal, "--fpr", "0.1"]) == 0
    return run


@pytest.fixture(autouse=True, scope="session")
def _random_vit_weights_in_a_hugging_face_cache(tmp_path_factory):
    """DINOv2 ViT-S/14 weights are not on this machine: a random-init file in timm's format, where `cada weights
    download` would put the real one (a Hugging Face cache of the session's own), so the ViT method builds as a
    user's would. Its quality means nothing; the tests check mechanics."""
    import timm
    from safetensors.torch import save_file

    from cada.backbones import VIT_BACKBONES

    cache = tmp_path_factory.mktemp("hugging-face-hub")
    timm_name = VIT_BACKBONES["vit_small_patch14_dinov2"]
    snapshot = cache / f"models--timm--{timm_name}" / "snapshots" / "0000000000000000000000000000000000000000"
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_CACHE", str(cache))
    yield cache
    patch.undo()
