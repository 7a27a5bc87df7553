"""Image and mask loading that copes with real files, and batching for the models."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cada.data.cache import open_cache
from cada.data.mvtec import Sample
from cada.data.resize import content_box, resize_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Masks whose aspect ratio differs from their image's by more than this are not the image's mask.
_ASPECT_TOLERANCE = 0.02
# Files whose header claims more pixels than this are refused before decoding (a decompression bomb: a few KB
# that would decode to gigabytes). Raise it for genuine larger images with the environment variable below.
MAX_IMAGE_PIXELS = 100_000_000
MAX_PIXELS_VARIABLE = "CADA_MAX_IMAGE_PIXELS"


class BadImageError(ValueError):
    """A file that cannot be used as an image or mask; the message names the file."""


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 from any PIL mode: 16-bit and 32-bit grey are scaled, alpha and palettes are resolved.

    ValueError for 32-bit integer pixels outside 0-65535: clipping them would silently saturate the image.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, dtype=np.float64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(
                f"its 32-bit pixel values span {grey.min():.0f} to {grey.max():.0f}, outside 0-65535, "
                "so they have no fixed scale to 8 bits (save it with 8 or 16 bits per channel)"
            )
        top = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey = np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        span = max(grey.max() - grey.min(), 1e-12)
        grey = ((grey - grey.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def max_image_pixels() -> int:
    """The pixel limit: MAX_IMAGE_PIXELS, or $CADA_MAX_IMAGE_PIXELS when set."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_PIXELS_VARIABLE} must be a positive whole number of pixels, got {text!r}")
    return limit


@contextmanager
def _pixel_limit(path: str | Path | BinaryIO, limit: int):
    """PIL's decompression-bomb check at cada's limit, as a BadImageError naming the file.

    PIL only warns between its limit and twice it, so its warning is made an error, and its limit is cada's while
    cada opens the file (restored after: a program using cada keeps its own PIL setting).
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(
            f"cannot read image {path}: its header claims more than cada's limit of {limit:,} pixels, "
            f"so it is not decoded (a decompression bomb?); for genuine larger images set "
            f"{MAX_PIXELS_VARIABLE}"
        ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image(path: str | Path | BinaryIO, name: str | Path | None = None) -> Image.Image:
    """Open an image fully (so truncated files fail here) and apply its EXIF orientation.

    `path` may also be a binary file object (an upload held in memory), then named `name` in messages.
    Refused with a BadImageError naming the file: unreadable or truncated files, files over the pixel limit
    (max_image_pixels), and float images with NaN or infinite pixels (there is no honest way to show them).
    """
    label = path if name is None else name
    with _opened(path, label) as image:
        image.load()
        if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
            raise BadImageError(f"cannot read image {label}: it has NaN or infinite pixel values")
        return ImageOps.exif_transpose(image)


@contextmanager
def _opened(path: str | Path | BinaryIO, name: str | Path | BinaryIO | None = None):
    """The PIL image of `path`, opened under the pixel limit; any failure to read it is a BadImageError naming
    the file (or `name`)."""
    label = path if name is None else name
    limit = max_image_pixels()
    try:
        with _pixel_limit(label, limit), Image.open(path) as image:
            yield image
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = str(error).replace(repr(path), repr(str(label)))  # PIL names a file object by its repr
        raise BadImageError(f"cannot read image {label}: {reason}") from error


def rgb_array(path: str | Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """The image as RGB uint8 H x W x 3 at its own size (EXIF orientation applied); BadImageError if unusable."""
    label = path if name is None else name
    try:
        return _to_rgb_array(read_image(path, name))
    except BadImageError:
        raise
    except ValueError as error:
        raise BadImageError(f"cannot read image {label}: {error}") from None


def load_image(path: str | Path, size: int, resize: str = "squash") -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 tensor 3 x size x size (`cada.data.resize`'s rule, squashed or letterboxed) and the original
    (width, height)."""
    rgb = rgb_array(path)
    return resize_rgb(rgb, size, resize), (rgb.shape[1], rgb.shape[0])


def load_mask(path: str | Path, size: int, image_size: tuple[int, int], resize: str = "squash") -> torch.Tensor:
    """bool tensor size x size, anomalous where the mask file is > 0 (nearest resize; placed as its image is by
    `resize`, the letterbox's padding normal).

    A mask of another resolution than its image is accepted when its aspect ratio matches (it is resized
    like the image); otherwise it cannot be the image's mask and we say so.
    """
    mask = read_image(path)
    if mask.size != image_size:
        mask_aspect, image_aspect = mask.size[0] / mask.size[1], image_size[0] / image_size[1]
        if abs(mask_aspect / image_aspect - 1) > _ASPECT_TOLERANCE:
            raise BadImageError(
                f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {image_size[0]}x{image_size[1]}: "
                "the aspect ratios differ, so it cannot be this image's mask"
            )
    left, top, width, height = content_box(*image_size, size, resize)
    binary = Image.fromarray(_binary(mask).astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    placed = torch.zeros(size, size, dtype=torch.bool)
    placed[top : top + height, left : left + width] = torch.from_numpy(np.array(binary) > 0)
    return placed


def _binary(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.convert("L") if mask.mode not in ("L", "1", "I", "I;16") else mask) > 0


def image_size_of(path: str | Path | BinaryIO, name: str | None = None) -> tuple[int, int]:
    """(width, height) as read_image would give it (EXIF rotation included), from the header alone; `name` as
    read_image's."""
    with _opened(path, name) as image:
        width, height = image.size
        rotated = image.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the axes
    return (height, width) if rotated else (width, height)


def original_mask(sample: Sample) -> np.ndarray:
    """The ground truth at its own resolution, bool H x W: the mask file, or for a normal image without one,
    zeros of the image's size."""
    if sample.mask_path is None:
        width, height = image_size_of(sample.path)
        return np.zeros((height, width), bool)
    return _binary(read_image(sample.mask_path))


def normalize(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float, ImageNet-normalised (what every encoder expects), on `device` (default: where
    the images are). The uint8 images are moved, not the floats: a quarter of the bytes."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class ImageSet(torch.utils.data.Dataset):
    """Samples -> dict(image uint8, mask bool, has_mask, index). A bad file yields an `error` entry instead.

    cache_dir: 'auto' (the default folder, see cada.data.cache), a folder, or None for no cache. resize: how an
    image fits the size x size input (cada.data.resize).
    """

    def __init__(
        self, samples: Sequence[Sample], size: int, cache_dir: str | Path | None = "auto", resize: str = "squash"
    ):
        self.samples = list(samples)
        self.size = size
        self.resize = resize
        self.cache = open_cache(cache_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, sample: Sample) -> np.ndarray:
        """4 x size x size uint8: RGB and the 0/1 mask (zeros when there is no mask file)."""
        image, original_size = load_image(sample.path, self.size, self.resize)
        both = np.zeros((4, self.size, self.size), np.uint8)
        both[:3] = image.numpy()
        if sample.mask_path is not None:
            both[3] = load_mask(sample.mask_path, self.size, original_size, self.resize).numpy()
        return both

    def _load(self, sample: Sample) -> np.ndarray:
        if self.cache is None:
            return self._decode(sample)
        try:
            # Squashed entries keep the key they had before letterboxing existed.
            settings = f"size={self.size}" + ("" if self.resize == "squash" else f"|resize={self.resize}")
            key = self.cache.key([sample.path, sample.mask_path], settings)
        except OSError:
            return self._decode(sample)  # unreadable: decoding reports it with its path
        stored = self.cache.get(key, (4, self.size, self.size))
        if stored is not None:
            return stored
        decoded = self._decode(sample)
        self.cache.put(key, decoded)
        return decoded

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            both = self._load(sample)
        except BadImageError as error:
            return {"index": index, "error": str(error)}
        # Normal images need no mask file: their mask is empty by definition.
        has_mask = sample.mask_path is not None or sample.label == 0
        # NumPy, not torch, for the mask test: torch's threaded kernels are slow on such small arrays.
        return {
            "index": index,
            "image": torch.from_numpy(both[:3]),
            "mask": torch.from_numpy(both[3] != 0),
            "has_mask": has_mask,
        }


def _collate(items: list[dict]) -> dict:
    good = [item for item in items if "error" not in item]
    batch = {
        "errors": [(item["index"], item["error"]) for item in items if "error" in item],
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
    }
    if good:
        batch["image"] = torch.stack([item["image"] for item in good])
        batch["mask"] = torch.stack([item["mask"] for item in good])
        batch["has_mask"] = torch.tensor([item["has_mask"] for item in good])
    return batch


def check_batch_size(batch_size) -> int:
    """`batch_size` if it is a positive integer, else ValueError (as scikit-learn checks its parameters)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def iterate_batches(
    samples: Sequence[Sample],
    size: int,
    batch_size: int = 16,
    workers: int = 1,
    strict: bool = False,
    cache_dir: str | Path | None = "auto",
    pin_memory: bool = False,
    resize: str = "squash",
) -> Iterator[dict]:
    """Batches of decoded images in sample order; decoding overlaps compute in `workers` processes. With
    `pin_memory` (for a CUDA device) the batches are in page-locked memory, so their copy to the GPU overlaps.

    A file that cannot be read is reported with its path and skipped, unless `strict`. Decoded images are
    cached on disk under `cache_dir` ('auto': the default folder; None: no cache).
    """
    max_image_pixels()  # a bad $CADA_MAX_IMAGE_PIXELS is one error here, not a skipped file per image
    check_batch_size(batch_size)
    loader = torch.utils.data.DataLoader(
        ImageSet(samples, size, cache_dir, resize),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
    )
    for batch in loader:
        for _index, message in batch["errors"]:
            if strict:
                raise BadImageError(message)
            warnings.warn(f"skipped: {message}")
        if len(batch["index"]):
            yield batch


def load_all(
    samples: Sequence[Sample],
    size: int,
    strict: bool = False,
    cache_dir: str | Path | None = "auto",
    workers: int = 1,
    resize: str = "squash",
) -> tuple[torch.Tensor, list[Sample]]:
    """All images as one uint8 tensor N x 3 x size x size (for training sets), with the samples kept."""
    images: list[torch.Tensor] = []
    kept: list[Sample] = []
    batches = iterate_batches(
        samples, size, batch_size=32, workers=workers, strict=strict, cache_dir=cache_dir, resize=resize
    )
    for batch in batches:
        images.append(batch["image"])
        kept.extend(samples[i] for i in batch["index"].tolist())
    if not images:
        raise ValueError("none of the images could be read")
    return torch.cat(images), kept
