"""Data: folder layouts (MVTec AD, VisA, BTAD, plain folders), image loading with an on-disk cache, and the
synthetic generator. `find_samples(root, split, format)` is the entry point for a data root."""

from cada.data.btad import btad_samples
from cada.data.cache import default_cache_dir
from cada.data.dataset import BadImageError, ImageSet, iterate_batches, load_all, load_image, load_mask
from cada.data.duplicates import find_duplicates, warn_duplicates
from cada.data.folder import folder_samples, image_files
from cada.data.layouts import Layout, detect_format, find_samples, formats
from cada.data.mvtec import Sample, mvtec_samples
from cada.data.visa import visa_samples

__all__ = [
    "BadImageError",
    "Layout",
    "ImageSet",
    "Sample",
    "btad_samples",
    "default_cache_dir",
    "detect_format",
    "find_duplicates",
    "find_samples",
    "folder_samples",
    "formats",
    "image_files",
    "iterate_batches",
    "load_all",
    "load_image",
    "load_mask",
    "mvtec_samples",
    "visa_samples",
    "warn_duplicates",
]
