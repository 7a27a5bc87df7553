"""Tiling, for large images with small defects (`Settings.tile`, `Settings.tile_overlap`, recorded in the run).

With t tiles per side, the model still sees S x S images (S = image_size), but each image is first fitted (squashed
or letterboxed, see cada.data.resize) to a larger square of L = S + (t - 1) x stride pixels, stride =
round(S x (1 - overlap)), and cut into t x t tiles of S x S, `stride` apart: neighbours share S - stride pixels.
L is the run's input size (`Settings.input_size`): images are loaded, cached, checked and exported at L.

A tiled run trains its base on the tiles of the training images, and its aligner on the tiles' statistics: each
tile is aligned by the statistics of the training tiles it resembles. An image's result combines its tiles':
- its map (base and aligned, each) is L x L, where tiles overlap the largest of their values;
- its aligned score is the largest of its tiles' aligned scores, and its u and spread are that tile's;
- its base score is the largest of its tiles' base scores;
- its distance to the training set (knn) is the largest of its tiles'.
Cutting and stitching are fixed slices and paddings, so the exported graph does both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def stride_of(size: int, overlap: float) -> int:
    """Pixels between neighbouring tiles: S x (1 - overlap), rounded, at least 1."""
    return max(1, round(size * (1 - overlap)))


def input_size(size: int, tiles: int, overlap: float) -> int:
    """The side L of the square an image is fitted to before it is cut into tiles x tiles tiles of size."""
    return size + (tiles - 1) * stride_of(size, overlap)


def _offsets(size: int, tiles: int, overlap: float) -> list[tuple[int, int]]:
    """(top, left) of each tile, row by row."""
    step = stride_of(size, overlap)
    return [(row * step, column * step) for row in range(tiles) for column in range(tiles)]


def cut(images: torch.Tensor, size: int, tiles: int, overlap: float) -> torch.Tensor:
    """B x C x L x L -> B*T x C x size x size: each image's T = tiles^2 tiles, row by row, images in order."""
    parts = [images[:, :, top : top + size, left : left + size] for top, left in _offsets(size, tiles, overlap)]
    return torch.stack(parts, dim=1).flatten(0, 1)


def stitch(maps: torch.Tensor, size: int, tiles: int, overlap: float) -> torch.Tensor:
    """B*T x size x size tile maps -> B x L x L, the largest tile value where tiles overlap. (`size` given, not read
    from the maps: traced for export, their shape is a tensor.)"""
    side = input_size(size, tiles, overlap)
    per_image = maps.unflatten(0, (-1, tiles * tiles))
    placed = (
        F.pad(per_image[:, index], (left, side - size - left, top, side - size - top), value=-torch.inf)
        for index, (top, left) in enumerate(_offsets(size, tiles, overlap))
    )
    return functools.reduce(torch.maximum, placed)  # two L x L maps per image in memory at a time, not T


def per_tile(items: list, tiles: int) -> list:
    """Per-image items (class names) -> the same for each of the images' tiles, in `cut`'s order."""
    return [item for item in items for _ in range(tiles * tiles)]


def per_image(values: torch.Tensor, tiles: int) -> torch.Tensor:
    """B*T per-tile values -> B x T."""
    return values.unflatten(0, (-1, tiles * tiles))
