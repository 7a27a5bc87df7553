"""Devices and precision on this CPU machine: choosing the device, the aligners on another device (meta),
bf16 autocast against float32, the CLI's --device/--precision, onnxruntime's providers. The base methods'
training step and inference on another device are in test_method_contract.py."""

import json

import numpy as np
import pytest
import torch

from cada.align import ALIGNERS, create_aligner
from cada.api import Detector
from cada.cli import main
from cada.config import preset
from cada.engine.device import autocast, resolve_device, resolve_precision
from cada.metrics import auroc
from cada.registry import METHODS
from cada.runtime import onnx_providers

from helpers import tiny_preset


def test_auto_is_the_processs_gpu_when_cuda_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")  # under torchrun: this process's GPU
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="4 CUDA device"):
        resolve_device("cuda:7")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cuda", "CUDA is not available"),
        ("cuda:1", "CUDA is not available"),
        ("gpu", "unknown device"),
        ("xla", "unsupported"),
    ],
)
def test_a_device_that_is_not_here_is_one_clear_error(monkeypatch, spec, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        resolve_device(spec)


def test_precision_auto_is_bf16_on_gpus_that_support_it_and_fp32_elsewhere(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) is None
    assert resolve_precision("fp16", torch.device("cuda", 0)) is torch.float16


@pytest.mark.parametrize("name", ALIGNERS.names())
def test_every_aligner_computes_its_statistics_on_the_features_device(name):
    """Fitted on the CPU, moved to another device (meta): stats() makes no tensor on the CPU."""
    settings = preset("cpu").aligner
    settings.iters, settings.batch_size, settings.smooth_l1_alpha = 2, 4, 0.1
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(12, 8, 2, 2, generator=generator)
    stats = torch.rand(12, 4, generator=generator) + torch.tensor([0.0, 1.0, 0.0, 0.5])  # mean, max, std, score
    classes = ["a", "b", "c"] * 4
    aligner = create_aligner(name, 8, settings)
    aligner.fit(features, stats, settings, generator, classes, progress=False)
    aligner.to("meta").eval()
    needs = classes[:3] if aligner.needs_class_names else None
    with torch.no_grad():
        u, gamma = aligner.stats(features[:3].to("meta"), needs)
        spread = aligner.spread(u, gamma)
    assert u.device.type == spread.device.type == "meta" and u.shape == spread.shape == (3,)


def test_state_sized_while_fitting_is_made_on_the_aligners_device():
    """Fitting runs on the features' device: what an aligner sizes then must not land on the CPU."""
    settings = preset("cpu").aligner
    for name in ("class-aware", "classifier"):
        aligner = create_aligner(name, 8, settings).to("meta")
        aligner._set_classes(["a", "b"])
        tensors = [aligner.class_u, aligner.class_gamma, *aligner.parameters()]
        assert all(t.device.type == "meta" for t in tensors)
    for name in ("knn", "knn-distance", "knn-level"):
        aligner = create_aligner(name, 8, settings).to("meta")
        aligner._allocate(5, 8)
        assert all(t.device.type == "meta" for t in aligner.buffers())


def test_bf16_autocast_on_the_cpu_stays_close_to_float32(calibrated_run, tiny_data):
    """The same trained run in float32 and under bf16 autocast (bf16 keeps 8 significant bits: ~0.4% per
    value): maps within 10% of the maps' range at worst and 2% on average (measured on this run: 5.5% and
    0.75%; median relative difference per pixel 0.23%), and the pooled aligned I-AUROC within 0.01."""
    from cada.data.dataset import load_all
    from cada.data.mvtec import mvtec_samples

    samples = mvtec_samples(tiny_data, "test")
    images = load_all(samples, 64)[0]
    labels = np.array([s.label for s in samples])
    full = Detector.load(calibrated_run, device="cpu", precision="fp32").infer(images)
    half_detector = Detector.load(calibrated_run, device="cpu", precision="bf16")
    assert half_detector.precision is torch.bfloat16
    half = half_detector.infer(images)
    assert half.maps.dtype == half.u.dtype == torch.float32  # maps and statistics stay float32
    scale = float(full.maps.max() - full.maps.min())
    difference = (half.maps - full.maps).abs()
    assert float(difference.max()) < 0.1 * scale and float(difference.mean()) < 0.02 * scale
    assert not torch.equal(half.maps, full.maps)  # autocast did run in bf16
    full_auroc = auroc(full.aligned_scores.numpy(), labels)
    half_auroc = auroc(half.aligned_scores.numpy(), labels)
    assert abs(full_auroc - half_auroc) <= 0.01


def test_autocast_is_off_for_fp32_and_on_for_bf16():
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), None):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


def test_the_command_line_takes_a_device_and_refuses_one_that_is_not_here(calibrated_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    command = ["evaluate", str(calibrated_run), "--data", str(tiny_data), "--json", str(out), "--quiet"]
    assert main([*command, "--device", "cpu", "--precision", "fp32"]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert (meta["device"], meta["precision"]) == ("cpu", "fp32")
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert (
            main(["predict", str(calibrated_run), str(tiny_data), "--out", str(tmp_path / "p"), "--device", "cuda"])
            == 2
        )
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["calibrate", str(calibrated_run), "--normal", str(tiny_data), "--precision", "fp16"]) == 2
    assert "fp16 on the CPU" in capsys.readouterr().err


def test_onnx_runs_on_the_cuda_provider_only_when_onnxruntime_has_it():
    cpu_only = ["CPUExecutionProvider"]
    assert onnx_providers("auto", cpu_only) == onnx_providers("cpu", cpu_only) == cpu_only
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        onnx_providers("cuda", cpu_only)
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto", with_cuda)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnx_providers("cuda:1", with_cuda)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert onnx_providers("cpu", with_cuda) == cpu_only
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        onnx_providers("mps", with_cuda)


def test_the_fp16_loss_scale_goes_into_the_checkpoint_and_comes_back(tmp_path):
    """fp16 training scales its loss (GradScaler); a resumed run continues with the scale it had, not a fresh one."""
    from cada.engine import Checkpointing, Trainer
    from cada.engine.samplers import PassSampler

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(8, 4)
    session = Checkpointing(tmp_path, model, {"toy": 1}, every=2)
    session.enter("base")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(session, progress=False)
    trainer.loop(
        "toy",
        3,
        optimizer,
        torch.Generator().manual_seed(0),
        lambda iteration, batch: model(data[batch]).pow(2).mean(),
        PassSampler(len(data), 2),
        settings=None,
        precision=torch.float16,
    )
    saved = json.loads((tmp_path / "state.json").read_text())
    scale = saved["scaler"]["scale"]
    assert saved["iteration"] == 2 and scale < 2.0**16  # backed off from GradScaler's initial 2^16 (an overflow)
    resumed = Checkpointing(tmp_path, model, {"toy": 1}, resume=True)
    resumed.enter("base")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    step, losses = resumed.begin_loop(
        "toy", 3, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.Generator(), PassSampler(8, 2), scaler
    )
    assert (step, len(losses), scaler.get_scale()) == (2, 2, scale)
    assert [row["step"] for row in resumed.log] == [1, 2]  # the training log up to the checkpoint


@pytest.mark.parametrize("method", METHODS.names())
def test_channels_last_weights_as_on_a_gpu_train_save_and_score_as_the_ordinary_layout(
    method, tiny_data, images, tmp_path
):
    """On a CUDA GPU the networks' convolution weights are channels-last (engine.device.memory_format). Forced
    here on the CPU: a training step runs, the run saves (safetensors wants contiguous tensors) and loads, and the
    maps equal the ordinary layout's up to the convolution kernels' float rounding."""
    import cada.api

    settings = tiny_preset(method, iters=2)
    ordinary = Detector(settings, pretrained=False).fit(tiny_data, progress=False)
    expected = ordinary.infer(images[:4])
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cada.api, "memory_format", lambda device: torch.channels_last)
    try:
        converted = ordinary.to("cpu")
        weights = [p for p in converted.method.parameters() if p.dim() == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
        result = converted.infer(images[:4])
        scale = float(expected.maps.abs().max())
        assert torch.allclose(result.maps, expected.maps, atol=1e-4 * scale, rtol=1e-4)
        converted.save(tmp_path / "run")
        trained = Detector(settings, pretrained=False).fit(tiny_data, progress=False)
        assert trained.training_info["base_seconds"] >= 0 and torch.isfinite(trained.infer(images[:2]).maps).all()
    finally:
        monkeypatch.undo()
    loaded = Detector.load(tmp_path / "run", device="cpu")
    assert torch.allclose(loaded.infer(images[:4]).maps, expected.maps, atol=1e-4 * scale, rtol=1e-4)
