"""cada train --config FILE (YAML or JSON; a run's config.json is one) and --set dotted.key=value: every setting
reachable, each validated as Settings are, a bad one refused in one line (exit 2)."""

import json

import pytest

from cada.cli import main
from cada.config import preset
from cada.config_files import make_settings


def _train(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize(
    "override, message",
    [
        ("base.speed=1", "unknown settings ['base.speed']"),
        ("nothing.x=1", "unknown settings ['nothing']"),
        ("base.lr=fast", "base.lr must be a finite number in (0, 10], got 'fast'"),
        ("patchcore.coreset_ratio=2", "patchcore.coreset_ratio must be a finite number in (0, 1], got 2"),
        ("seed.x=1", "seed is a value, not a block of settings"),
        ("base.lr", "--set takes dotted.key=value"),
    ],
)
def test_a_bad_key_or_value_is_one_line_and_exit_2(override, message, tiny_data, tmp_path, capsys):
    assert main(_train(tiny_data, tmp_path / "run", "--set", override)) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error
    assert not (tmp_path / "run").exists()


def test_a_bad_config_file_is_one_line_and_exit_2(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base:\n  batch_size: -1\n")
    assert main(_train(tiny_data, tmp_path / "run", "--config", str(bad))) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "base.batch_size must be an integer in [1, 4096], got -1" in error
    bad.write_text("base: [1\n")
    assert main(_train(tiny_data, tmp_path / "run", "--config", str(bad))) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_layers_preset_then_file_then_options_then_set(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("method: cfa\nimage_size: 96\nbase:\n  lr: 1e-2\n  iters: 7\ncfa:\n  k: 5\n")
    settings = make_settings("cpu", config=config, image_size=64, overrides=["cfa.j=2", "base.betas=[0.8, 0.9]"])
    expected = preset("cpu", "cfa")
    expected.image_size, expected.base.lr, expected.base.iters, expected.base.betas = 64, 1e-2, 7, (0.8, 0.9)
    expected.cfa.k, expected.cfa.j = 5, 2
    assert settings == expected


def test_a_runs_config_json_trains_the_same_settings_again(tiny_data, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert (
        main(
            _train(
                tiny_data,
                first,
                "--method",
                "patchcore",
                "--image-size",
                "64",
                "--backbone",
                "efficientnet_lite0",
                "--align",
                "none",
                "--set",
                "patchcore.coreset_ratio=0.05",
            )
        )
        == 0
    )
    assert main(_train(tiny_data, second, "--config", str(first / "config.json"))) == 0
    settings = [json.loads((run / "config.json").read_text())["settings"] for run in (first, second)]
    assert settings[0] == settings[1] and settings[0]["patchcore"]["coreset_ratio"] == 0.05
