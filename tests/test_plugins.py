"""A method and an aligner added as one file each, outside the package ($CADA_PLUGINS): `cada train` and
`cada evaluate` use them with no other file changed."""

import json
import os

import pytest

from cada import registry
from cada.cli import main

from helpers import train_args

TINY_METHOD = '''
"""A tiny method: a 1x1 convolution bottleneck rebuilds the encoder's last features; the map is its error."""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from cada.backbones import create_encoder
from cada.engine import FeatureSource
from cada.methods.base import BaseMethod, MethodOutput
from cada.registry import METHODS


@dataclass
class TinyOptions:
    width: int = 8
    RANGES = {"width": "[1, 64]"}


def _cpu(settings):
    settings.base.iters, settings.base.epochs, settings.base.batch_size = 2, None, 4


@METHODS.register("tinyplug", options=TinyOptions, presets={"cpu": _cpu})
class TinyPlug(BaseMethod):
    def __init__(self, backbone, image_size, pretrained=True, weights_path=None, width=8):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=pretrained, weights_path=weights_path, stages="revdist")
        channels = self.encoder.channels[-1]
        self.squeeze, self.expand = nn.Conv2d(channels, width, 1), nn.Conv2d(width, channels, 1)
        self.align_channels = channels

    def error(self, feature):
        return (self.expand(self.squeeze(feature)) - feature).pow(2).mean(dim=1, keepdim=True)

    def forward(self, x):
        feature = self.encoder(x)[-1]
        anomaly_map = F.interpolate(self.error(feature), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return MethodOutput(anomaly_map.squeeze(1), feature)

    def objective(self, images, settings, generator, cache_gib, trainer):
        features = FeatureSource(lambda x: [self.encoder(x)[-1]], images, settings.batch_size, cache_gib,
                                 trainer)
        parameters = [*self.squeeze.parameters(), *self.expand.parameters()]
        return [{"params": parameters}], lambda iteration, batch: self.error(features[batch][0]).mean()
'''

TINY_ALIGNER = '''
"""A tiny aligner: u = 0 and gamma = the median training image score, for every image."""
import torch

from cada.align.base import Aligner
from cada.lookalike import SCORE
from cada.registry import ALIGNERS


@ALIGNERS.register("median-level")
class MedianLevel(Aligner):
    def __init__(self, channels, settings):
        super().__init__()
        self.register_buffer("level", torch.tensor(1.0))

    def fit(self, features, image_stats, settings, generator, class_names=None, progress=True, trainer=None):
        self.level.fill_(float(image_stats[:, SCORE].median()))
        self.set_min_spread(image_stats)
        return []

    def stats(self, features, class_names=None):
        return features.new_zeros(len(features)), self.level.expand(len(features))
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The two plugin files named in $CADA_PLUGINS; the registries are as before once the test ends."""
    monkeypatch.setattr(registry.METHODS, "_entries", dict(registry.METHODS._all()))
    monkeypatch.setattr(registry.ALIGNERS, "_entries", dict(registry.ALIGNERS._all()))
    monkeypatch.setattr(registry, "_loaded_plugins", set())
    method, aligner = tmp_path / "tiny_method.py", tmp_path / "tiny_aligner.py"
    method.write_text(TINY_METHOD)
    aligner.write_text(TINY_ALIGNER)
    monkeypatch.setenv(registry.PLUGINS_ENV, os.pathsep.join([str(method), str(aligner)]))


def test_a_method_and_an_aligner_from_files_train_and_evaluate(plugins, tiny_data, tmp_path, capsys):
    run, results = tmp_path / "run", tmp_path / "results.json"
    plugin_options = ("--method", "tinyplug", "--align", "median-level", "--backbone", "efficientnet_lite0")
    assert main(train_args(tiny_data, run, *plugin_options)) == 0
    assert capsys.readouterr().out.startswith("training tinyplug (efficientnet_lite0, 64px, 2 iters of batch 4")
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["tinyplug"] == {"width": 8}  # its options block, under its name
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--json", str(results), "--quiet"]) == 0
    rows = json.loads(results.read_text())["rows"]
    assert {(row["method"], row["align"]) for row in rows} == {("tinyplug", "none"), ("tinyplug", "median-level")}


def test_a_plugin_options_block_is_validated_as_every_setting(plugins):
    from cada.config import preset

    settings = preset("cpu", "tinyplug")
    settings.tinyplug.width = 100
    with pytest.raises(ValueError, match=r"tinyplug.width must be an integer in \[1, 64\], got 100"):
        settings.validate()


def test_a_missing_plugin_file_and_a_taken_name_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_loaded_plugins", set())
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path / "absent.py"))
    with pytest.raises(ValueError, match="absent.py, which is not a file"):
        registry.METHODS.names()
    monkeypatch.delenv(registry.PLUGINS_ENV)

    with pytest.raises(ValueError, match="the method name 'revdist' is taken"):

        @registry.METHODS.register("revdist")
        class Another:
            pass


TINY_LAYOUT = '''
"""A tiny layout: ROOT/<class>/normal/* are a class's training images; recognised by its `normal` folders."""
from cada.data.folder import image_files
from cada.data.layouts import Layout
from cada.data.mvtec import Sample
from cada.registry import LAYOUTS


@LAYOUTS.register("normal-folders")
class NormalFolders(Layout):
    looked_for = "normal folders (<class>/normal)"
    specificity = 30

    def recognises_class(self, folder):
        return (folder / "normal").is_dir()

    def samples(self, root, split, classes=None):
        if split == "test":
            raise ValueError("normal-folders has no test images")
        folders = [d for d in sorted(root.iterdir()) if (d / "normal").is_dir()]
        folders = [d for d in folders if classes is None or d.name in classes]
        return [Sample(path, 0, folder.name, "good") for folder in folders for path in image_files(folder / "normal")]
'''


def test_a_data_layout_from_a_file_is_recognised_and_trained_on(tiny_data, tmp_path, monkeypatch, capsys):
    import shutil

    from cada.data.layouts import find_samples, formats

    monkeypatch.setattr(registry.LAYOUTS, "_entries", dict(registry.LAYOUTS._all()))
    monkeypatch.setattr(registry, "_loaded_plugins", set())
    layout = tmp_path / "tiny_layout.py"
    layout.write_text(TINY_LAYOUT)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(layout))
    root = tmp_path / "flat"
    for product in sorted(p for p in tiny_data.iterdir() if p.is_dir()):
        shutil.copytree(product / "train" / "good", root / product.name / "normal")
    assert "normal-folders" in formats()
    samples, chosen = find_samples(root, "train")
    assert chosen == "normal-folders" and len(samples) == len(find_samples(tiny_data, "train")[0])
    assert main(train_args(root, tmp_path / "run")) == 0
    assert "data layout: normal-folders" in capsys.readouterr().out
