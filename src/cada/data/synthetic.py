"""A small synthetic industrial-inspection data set in the MVTec AD folder layout.

Four made-up product classes that look clearly different (a fine woven fabric, smooth
low-contrast marble, a metal washer on a plain background, a circuit board) and four defect
kinds (scratch, spot, missing, colour), each with a pixel mask of exactly the changed region.
Everything is drawn with numpy from a seed, so the same arguments give byte-identical files.
It is the embedded default data for the demo and the tests:

    generate_dataset(root)  writes  root/<class>/train/good/NNN.png
                                    root/<class>/test/good/NNN.png
                                    root/<class>/test/<defect>/NNN.png
                                    root/<class>/ground_truth/<defect>/NNN_mask.png
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES: tuple[str, ...] = ("weave", "marble", "washer", "circuit")
DEFECTS: tuple[str, ...] = ("scratch", "spot", "missing", "colour")

MARKER = ".cada_synthetic.json"  # marks a folder as our own output, so re-generating may overwrite it
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}  # mixed into the per-image seed
MIN_SIZE = 64  # smaller images leave no room for a defect of 30+ pixels that stays under 5% of the image
_CHANGE_THRESHOLD = 10  # grey levels; smaller changes are reverted so the mask is exactly what changed


# ----------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False  # shared between calls
    return y, x


def _rgb(*colours) -> np.ndarray:
    return np.array(colours if len(colours) > 1 else colours[0], np.float32)


def _noise(rng: np.random.Generator, size: int, std: float) -> np.ndarray:
    """Grey sensor noise, HxWx1 (one channel: normal draws are the slowest part of rendering)."""
    return rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(std)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """White noise blurred with a Gaussian of std `scale` pixels (in Fourier space), normalised to std 1."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    smooth = np.fft.irfft2(np.fft.rfft2(white) * np.exp(-2 * (np.pi * scale) ** 2 * (fy**2 + fx**2)), s=white.shape)
    return (smooth / (smooth.std() + 1e-12)).astype(np.float32)


def _wrap_angle(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


def _morph(mask: np.ndarray, radius: int, op) -> np.ndarray:
    """Square binary dilation (op=np.logical_or) or erosion (op=np.logical_and) by shifting the padded mask."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=op is np.logical_and)
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out = op(out, padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w])
    return out


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- normal images
# Each _scene_* returns (float image HxWx3, region where defects may go or None, background for "missing" or None).


def _scene_weave(rng: np.random.Generator, size: int):
    """Plain-weave fabric: blue warp and light weft threads alternating over/under every cell."""
    y, x = _grid(size)
    period = max(5.0, size / 24)
    angle = rng.uniform(-0.03, 0.03)  # the cloth lies slightly skewed
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 1)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period + rng.uniform(0, 1)
    i, j = np.floor(u), np.floor(v)
    fu, fv = u - i, v - j
    # round thread cross-sections covering 84% of a cell; threads dip where they pass under
    warp = np.sqrt(np.clip(1 - ((fu - 0.5) / 0.42) ** 2, 0, 1)) * (0.55 + 0.45 * np.sin(np.pi * fv))
    weft = np.sqrt(np.clip(1 - ((fv - 0.5) / 0.42) ** 2, 0, 1)) * (0.55 + 0.45 * np.sin(np.pi * fu))
    warp_on_top = (i + j) % 2 == 0
    show_warp = np.where(warp_on_top, warp > 0, (weft == 0) & (warp > 0))
    show_weft = ~show_warp & (weft > 0)
    # every thread has its own slight brightness, like real yarn
    warp_gain = 1 + 0.07 * rng.standard_normal(64, dtype=np.float32)[np.mod(i, 64).astype(int)]
    weft_gain = 1 + 0.07 * rng.standard_normal(64, dtype=np.float32)[np.mod(j, 64).astype(int)]
    weft_shade = np.where(show_weft, (0.35 + 0.65 * weft) * weft_gain, 1)
    shade = np.where(show_warp, (0.35 + 0.65 * warp) * warp_gain, weft_shade)
    palette = _rgb([15, 20, 35], [50, 80, 150], [215, 210, 195])  # gap, warp, weft
    img = palette[show_warp + 2 * show_weft] * shade[..., None]
    return img * rng.uniform(0.95, 1.05) + _noise(rng, size, 4), None, None


def _scene_marble(rng: np.random.Generator, size: int):
    """Polished beige marble: broad soft grey-green veins bent by smooth noise, very little fine detail."""
    y, x = _grid(size)
    angle = rng.uniform(0, np.pi)
    along = (x * np.cos(angle) + y * np.sin(angle)) / size
    turbulence = 1.2 * _smooth_noise(rng, size, size / 8) + 0.25 * _smooth_noise(rng, size, size / 25)
    veins = np.exp(-((np.sin(2 * np.pi * along + turbulence) / 0.5) ** 2))
    cloud = _smooth_noise(rng, size, size / 8)
    base, vein = _rgb([222, 212, 196], [180, 188, 172])
    img = base + 5 * cloud[..., None] + 0.7 * veins[..., None] * (vein - base)
    return img * rng.uniform(0.97, 1.03) + _noise(rng, size, 0.8), None, None


def _scene_washer(rng: np.random.Generator, size: int):
    """A lit metal washer with a key notch, jittered in position and rotation, on dark slate."""
    y, x = _grid(size)
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    dy, dx = y - cy, x - cx
    r = np.hypot(dy, dx) / size
    theta = np.arctan2(dy, dx) - rng.uniform(-0.3, 0.3)  # rotation jitter shows in the notch
    inner = np.where(np.abs(_wrap_angle(theta + np.pi / 2)) < 0.22, np.float32(0.165), np.float32(0.13))
    outer = 0.33
    # anti-aliased rims (one pixel ramp)
    alpha = np.clip((outer - r) * size + 0.5, 0, 1) * np.clip((r - inner) * size + 0.5, 0, 1)
    # light from the upper left, fine concentric machining marks, darker bevels at both rims
    light = 0.78 - 0.22 * (dx + dy) / (size * 0.47)
    marks = 0.04 * np.sin(2 * np.pi * r * size / 3.0)
    bevel = 0.25 * (np.exp(-((((outer - r) * size) / 2.5) ** 2)) + np.exp(-((((r - inner) * size) / 2.5) ** 2)))
    metal = _rgb([190, 195, 205]) * (light + marks - bevel)[..., None]
    bg = _rgb([42, 50, 64]) * (1 + 0.05 * _smooth_noise(rng, size, size / 6) - 0.15 * r)[..., None]
    img = alpha[..., None] * metal + (1 - alpha[..., None]) * bg
    return img + _noise(rng, size, 2), alpha >= 1, bg


@lru_cache(maxsize=1)
def _circuit_layout() -> tuple[tuple, ...]:
    """The fixed board design in units of the image size: (shape, y0, x0, y1_or_r, x1, rgb) in drawing order."""
    rng = np.random.default_rng(20240611)  # one product design, independent of the data-set seed
    trace, pad, hole = (70, 160, 90), (212, 172, 80), (12, 12, 12)
    chip, pin, body, silk = (35, 35, 40), (200, 200, 205), (120, 90, 60), (225, 225, 215)
    lattice = np.linspace(0.08, 0.92, 15)
    items: list[tuple] = []
    ends = []
    for _ in range(22):  # L-shaped traces between lattice points, vias at both ends
        (ya, yb), (xa, xb) = lattice[rng.choice(15, 2, replace=False)], lattice[rng.choice(15, 2, replace=False)]
        w = 0.007
        items.append(("rect", ya - w, min(xa, xb) - w, ya + w, max(xa, xb) + w, trace))
        items.append(("rect", min(ya, yb) - w, xb - w, max(ya, yb) + w, xb + w, trace))
        ends += [(ya, xa), (yb, xb)]
    for yy, xx in ends:
        items.append(("disc", yy, xx, 0.018, None, pad))
        items.append(("disc", yy, xx, 0.007, None, hole))
    chips = ((0.18, 0.25, 0.36, 0.55), (0.58, 0.55, 0.8, 0.72))
    for y0, x0, y1, x1 in chips:  # two ICs with pins on the long sides
        items.append(("rect", y0 - 0.015, x0 - 0.015, y1 + 0.015, x1 + 0.015, silk))
        # bare board inside the outline, then pins, then the chip body over the middle of the pins
        items.append(("rect", y0 - 0.01, x0 - 0.01, y1 + 0.01, x1 + 0.01, (25, 95, 55)))
        for xp in np.arange(x0 + 0.02, x1 - 0.01, 0.035):
            items.append(("rect", y0 - 0.035, xp - 0.007, y1 + 0.035, xp + 0.007, pin))
        items.append(("rect", y0, x0, y1, x1, chip))
    placed = 0
    while placed < 7:  # two-pad SMD parts (resistors, capacitors), kept off the chips
        yy, xx = rng.uniform(0.1, 0.9, 2)
        if any(y0 - 0.07 < yy < y1 + 0.07 and x0 - 0.08 < xx < x1 + 0.08 for y0, x0, y1, x1 in chips):
            continue
        placed += 1
        items.append(("rect", yy - 0.02, xx - 0.045, yy + 0.02, xx + 0.045, pad))
        items.append(("rect", yy - 0.017, xx - 0.025, yy + 0.017, xx + 0.025, body))
    return tuple(items)


def _scene_circuit(rng: np.random.Generator, size: int):
    """A green circuit board with traces, vias, chips and small parts, jittered by a few pixels."""
    oy, ox = rng.uniform(-0.012, 0.012, 2) * size
    board = _rgb([25, 95, 55]) * (1 + 0.04 * _smooth_noise(rng, size, size / 20))[..., None]
    img = board.copy()
    for shape, y0, x0, a, b, rgb in _circuit_layout():
        if shape == "rect":
            r0, r1 = int(round(y0 * size + oy)), int(round(a * size + oy))
            c0, c1 = int(round(x0 * size + ox)), int(round(b * size + ox))
            img[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = rgb
        else:  # disc: only touch its bounding box
            cy, cx, rad = y0 * size + oy, x0 * size + ox, max(a * size, 1.0)
            r0, r1 = max(int(cy - rad) - 1, 0), min(int(cy + rad) + 2, size)
            c0, c1 = max(int(cx - rad) - 1, 0), min(int(cx + rad) + 2, size)
            yy, xx = np.mgrid[r0:r1, c0:c1]
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2
            img[r0:r1, c0:c1][inside] = rgb
    img = img * rng.uniform(0.95, 1.05) + _noise(rng, size, 3)
    return img, None, board


_SCENES = {"weave": _scene_weave, "marble": _scene_marble, "washer": _scene_washer, "circuit": _scene_circuit}


def _scene(class_name: str, rng: np.random.Generator, image_size: int):
    if class_name not in _SCENES:
        raise ValueError(f"unknown class {class_name!r}; choose from {CLASSES}")
    if image_size < MIN_SIZE:
        raise ValueError(f"image_size must be at least {MIN_SIZE}, got {image_size}")
    img, region, background = _SCENES[class_name](rng, image_size)
    return _to_uint8(img), region, None if background is None else _to_uint8(background)


def render(class_name: str, rng: np.random.Generator, image_size: int = 256) -> np.ndarray:
    """One normal image of `class_name` as an HxWx3 uint8 array."""
    return _scene(class_name, rng, image_size)[0]


# ----------------------------------------------------------------------------- defects
# Each _draw_* gets the float image and a centre and returns (changed float image, bool support of the change).


def _blob(shape: tuple[int, int], centre, radius: float, soft: float, rng: np.random.Generator) -> np.ndarray:
    """Opacity 0..1 of an irregular, rotated elliptic blob with a soft edge `soft` pixels wide."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dy, dx = y - centre[0], x - centre[1]
    turn, aspect = rng.uniform(0, np.pi), rng.uniform(0.55, 1.0)
    a = dx * np.cos(turn) + dy * np.sin(turn)
    b = (-dx * np.sin(turn) + dy * np.cos(turn)) / aspect
    theta = np.arctan2(b, a)
    wobble = 1 + sum(rng.uniform(0, 0.12) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.clip((radius * wobble - np.hypot(a, b)) / soft, 0, 1)


def _contrasting(img: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark colour on bright surroundings, a bright one on dark surroundings, so the defect is visible."""
    local = _luminance((img * weight[..., None]).sum((0, 1)) / (weight.sum() + 1e-9))
    return rng.uniform(15, 60, 3) if local > 100 else rng.uniform(185, 245, 3)


def _draw_scratch(img, centre, rng, background):
    h, w = img.shape[:2]
    length = rng.uniform(0.25, 0.5) * min(h, w)
    direction = rng.uniform(0, 2 * np.pi)
    along = np.array([np.sin(direction), np.cos(direction)])
    across = np.array([along[1], -along[0]])
    c = np.asarray(centre, float)
    p0, p2 = c - along * length / 2, c + along * length / 2
    p1 = c + across * rng.uniform(-0.3, 0.3) * length  # bend: straight to gently curved
    t = np.linspace(0, 1, int(4 * length))[:, None]
    points = np.round((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2).astype(int)
    points = points[(points[:, 0] >= 0) & (points[:, 0] < h) & (points[:, 1] >= 0) & (points[:, 1] < w)]
    line = np.zeros((h, w), bool)
    line[points[:, 0], points[:, 1]] = True
    line = _morph(line, max(1, min(h, w) // 200), np.logical_or)  # 3 px wide below 400 px images
    target = _contrasting(img, line.astype(float), rng).mean()  # scratches are grey: bright or dark
    return np.where(line[..., None], img + 0.8 * (target - img), img), line


def _draw_spot(img, centre, rng, background):
    radius = rng.uniform(0.045, 0.1) * min(img.shape[:2])
    alpha = _blob(img.shape[:2], centre, radius, 0.35 * radius, rng)
    colour = _contrasting(img, alpha, rng)
    alpha = 0.9 * alpha[..., None]
    return img * (1 - alpha) + colour * alpha, alpha[..., 0] > 0


def _draw_missing(img, centre, rng, background):
    radius = rng.uniform(0.045, 0.095) * min(img.shape[:2])
    hole = _blob(img.shape[:2], centre, radius, 1.0, rng) >= 0.5
    if background is not None:  # the object is gone: what lies behind it shows
        fill = background.astype(np.float64)
    else:  # a hole in the material: a flat, texture-less patch, much darker (or lighter) than around it
        local = img[hole].mean(axis=0)
        fill = 0.4 * local if _luminance(local) > 100 else 255 - 0.4 * (255 - local)
    return np.where(hole[..., None], fill, img), hole


# colour casts to choose from: rust, blue, green, purple
_TINTS = np.array([[1.5, 0.75, 0.45], [0.55, 0.8, 1.6], [0.65, 1.4, 0.6], [1.45, 0.6, 1.5]])


def _draw_colour(img, centre, rng, background):
    radius = rng.uniform(0.055, 0.11) * min(img.shape[:2])
    alpha = _blob(img.shape[:2], centre, radius, 0.3 * radius, rng)
    local = (img * alpha[..., None]).sum((0, 1)) / (alpha.sum() + 1e-9) + 1
    # the cast that changes the local hue most (a green cast on a green board would hardly show);
    # multiplying keeps the texture inside the blob
    hue_change = np.abs(local * _TINTS / (local * _TINTS).sum(1, keepdims=True) - local / local.sum()).sum(1)
    tint = _TINTS[np.argmax(hue_change)] * rng.uniform(0.8, 1.2)
    return img * (1 - alpha[..., None]) + img * tint * alpha[..., None], alpha > 0


_DRAWERS = {"scratch": _draw_scratch, "spot": _draw_spot, "missing": _draw_missing, "colour": _draw_colour}


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    region: np.ndarray | None = None,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` into a copy of `image`; returns (image uint8 HxWx3, bool mask HxW).

    The mask is exactly the set of changed pixels (small holes closed); everything outside it is left
    untouched. `region` (bool HxW) keeps the defect on an object; `background` (HxWx3) is what a
    "missing" defect reveals (default: a flat contrasting fill). The mask covers 0.2% - 5% of the image.
    """
    if kind not in _DRAWERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    h, w = image.shape[:2]
    allowed = np.ones((h, w), bool) if region is None else np.asarray(region, bool)
    # centres stay away from the border so the defect is mostly inside the image
    margin = int(0.08 * min(h, w))
    inner = np.zeros((h, w), bool)
    inner[margin : h - margin, margin : w - margin] = True
    candidates = np.flatnonzero(allowed & inner)
    if candidates.size == 0:
        raise ValueError("region leaves no room for a defect")
    min_px, max_px = max(30, int(0.002 * h * w)), int(0.05 * h * w)
    old = image.astype(np.float64)
    for _ in range(100):  # a placement can miss (e.g. "missing" on bare board); just try another
        centre = np.unravel_index(rng.choice(candidates), (h, w))
        new, support = _DRAWERS[kind](old, centre, rng, background)
        new = np.clip(np.round(new), 0, 255)
        changed = np.abs(new - old).max(axis=2) >= _CHANGE_THRESHOLD
        closed = _morph(_morph(changed, 1, np.logical_or), 1, np.logical_and)  # fill pinholes
        mask = closed & support & allowed
        if min_px <= mask.sum() <= max_px:
            return np.where(mask[..., None], new, old).astype(np.uint8), mask
    raise RuntimeError(f"could not place a visible {kind!r} defect of 0.2%-5% of the image")


# ----------------------------------------------------------------------------- data set


def _image_rng(seed: int, class_name: str, split: str, index: int) -> np.random.Generator:
    # one stream per image, so changing one count never changes the other images
    return np.random.default_rng(np.random.SeedSequence([seed, CLASSES.index(class_name), _SPLIT_CODES[split], index]))


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _prepare_root(root: Path, classes: list[str]) -> None:
    """Refuse foreign non-empty folders; clear our own previous output so no stale files survive."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} exists and is not a folder")
    marker = root / MARKER
    if root.is_dir() and any(root.iterdir()):
        if not marker.is_file():
            raise ValueError(
                f"refusing to write synthetic data into {root}: the folder is not empty and is not a previous "
                f"output of cada.data.synthetic (no {MARKER}); choose an empty or new folder"
            )
        try:
            previous = json.loads(marker.read_text())["classes"]
        except (ValueError, KeyError, TypeError):
            previous = list(CLASSES)
        for name in previous:
            if name in CLASSES and (root / name).is_dir():  # only ever delete our own class folders
                shutil.rmtree(root / name)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"generator": "cada.data.synthetic", "classes": classes}) + "\n")


def _write_image(root: Path, name: str, split: str, k: int, size: int, seed: int) -> None:
    """Render and save image `k` of one class and split (plus its mask for defects)."""
    rng = _image_rng(seed, name, split, k)
    if split != "test_defect":
        sub = "train/good" if split == "train" else "test/good"
        _save(render(name, rng, size), root / name / sub / f"{k:03d}.png")
        return
    kind, index = DEFECTS[k % len(DEFECTS)], k // len(DEFECTS)  # round robin, numbered from 000 per defect folder
    image, region, background = _scene(name, rng, size)
    bad, mask = add_defect(image, kind, rng, region=region, background=background)
    _save(bad, root / name / "test" / kind / f"{index:03d}.png")
    _save(mask.astype(np.uint8) * 255, root / name / "ground_truth" / kind / f"{index:03d}_mask.png")


def generate_dataset(
    root: str | Path,
    *,
    classes: list[str] | tuple[str, ...] | None = None,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 12,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the synthetic data set under `root` in the MVTec AD layout and return Path(root).

    `n_test_defect` is per class, spread round robin over DEFECTS. Same arguments give byte-identical
    files. Refuses (ValueError) a non-empty folder that is not a previous output of this generator.
    """
    names = list(dict.fromkeys(CLASSES if classes is None else classes))  # no duplicates: threads would race
    unknown = [c for c in names if c not in CLASSES]
    if unknown or not names:
        raise ValueError(f"unknown or no classes {unknown}; choose from {CLASSES}")
    for label, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if int(value) != value or value < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
    if image_size < MIN_SIZE:
        raise ValueError(f"image_size must be at least {MIN_SIZE}, got {image_size}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(root)
    _prepare_root(root, names)
    counts = {"train": int(n_train), "test_good": int(n_test_good), "test_defect": int(n_test_defect)}
    jobs = [(name, split, k) for name in names for split, count in counts.items() for k in range(count)]
    # every image has its own seed, so threads cannot change the output; numpy and PNG encoding release the GIL
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: _write_image(root, job[0], job[1], job[2], int(image_size), int(seed)), jobs))
    return root
