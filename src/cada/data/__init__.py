"""Data: folder layouts, image loading and the synthetic generator."""

from cada.data.dataset import ImageSet, load_image, load_mask
from cada.data.mvtec import Sample, mvtec_samples

__all__ = ["ImageSet", "Sample", "load_image", "load_mask", "mvtec_samples"]
