"""DRAEM (Zavrtanik et al., ICCV 2021): a discriminatively trained reconstruction embedding.

Two sub-networks are trained together on synthetic anomalies. The reconstructive one (an encoder-decoder
without skip connections) learns to turn an image with a pasted anomaly back into the clean image (L2 + SSIM
loss); the discriminative one (a U-Net) reads the reconstruction and the input side by side and segments the
anomaly (focal loss). The anomaly map is the softmax probability of its "anomalous" channel, in 0..1.

Synthetic anomalies follow DRAEM: a Perlin-noise map at random scales (2^0..2^5 lattice cells per axis), rotated
by a random angle in (-90, 90) degrees and thresholded at 0.5, gives the mask; inside it the image is replaced by
beta * image + (1 - beta) * texture, beta uniform in [0.1, 1.0] (the paper's range); half of the training
images stay clean. DRAEM takes its textures from the DTD data set, which is not available offline: here the
texture is, with equal probability, **another training image** or a **procedurally generated texture**
(fractal Perlin colour noise, optionally striped or checkered), each then altered by three random colour
operations, as DRAEM alters its DTD textures. DRAEM's random rotation of the clean training image is left out.

DRAEM has no pretrained encoder of its own. For CADA it gets a frozen ImageNet encoder
(`create_encoder(backbone, stages="revdist")`) whose last stage (stride 16) is the `align_features`; the encoder
plays no part in DRAEM's own map. Sub-network widths: the reference's 128 / 64 in the paper preset, smaller in
the cpu preset (`Settings.draem`). All randomness of training (masks, textures, batches) comes from `generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cada.backbones import create_encoder
from cada.config import BaseTraining
from cada.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from cada.engine import Trainer
from cada.engine.loop import LossOf
from cada.methods.base import BaseMethod, MethodOutput
from cada.registry import METHODS

PERLIN_MAX_OCTAVE = 6  # lattice cells per axis: 2 ** randint(0, 6), as DRAEM
MASK_THRESHOLD = 0.5
ANOMALY_PROBABILITY = 0.5  # DRAEM leaves half of the training images clean
BETA_RANGE = (0.1, 1.0)  # image opacity inside the mask (DRAEM paper)
TEXTURE_FROM_IMAGES = 0.5  # probability that the texture is another training image (else procedural)


# ----------------------------------------------------------------------------------------------- sub-networks


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _double_conv(in_channels: int, out_channels: int, middle: int | None = None) -> nn.Sequential:
    middle = out_channels if middle is None else middle
    return nn.Sequential(*_conv_bn_relu(in_channels, middle), *_conv_bn_relu(middle, out_channels))


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv_bn_relu(in_channels, out_channels)
    )


class ReconstructiveNetwork(nn.Module):
    """DRAEM's reconstructive sub-network: 4 poolings down to 8 x width channels at 1/16, 4 upsamplings back;
    no skip connections (they would let anomalies through). 3 -> 3 channels."""

    def __init__(self, width: int = 128, channels: int = 3):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            _double_conv(channels, w),
            nn.MaxPool2d(2),
            _double_conv(w, 2 * w),
            nn.MaxPool2d(2),
            _double_conv(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _double_conv(4 * w, 8 * w),
            nn.MaxPool2d(2),
            _double_conv(8 * w, 8 * w),
        )
        self.decoder = nn.Sequential(
            _up(8 * w, 8 * w),
            _double_conv(8 * w, 4 * w, middle=8 * w),
            _up(4 * w, 4 * w),
            _double_conv(4 * w, 2 * w, middle=4 * w),
            _up(2 * w, 2 * w),
            _double_conv(2 * w, w, middle=2 * w),
            _up(w, w),
            _double_conv(w, w),
            nn.Conv2d(w, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DiscriminativeNetwork(nn.Module):
    """DRAEM's discriminative sub-network: a U-Net with 5 poolings (6 levels) over the reconstruction and the
    input concatenated (6 channels), ending in 2 channels: normal, anomalous."""

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2):
        super().__init__()
        w = width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.down = nn.ModuleList()
        previous = in_channels
        for channels in widths:
            self.down.append(_double_conv(previous, channels))
            previous = channels
        self.pool = nn.MaxPool2d(2)
        # Decoder from the deepest level: (upsampled channels, skip channels, output channels)
        plan = [(8 * w, 8 * w, 8 * w), (4 * w, 8 * w, 4 * w), (2 * w, 4 * w, 2 * w), (w, 2 * w, w), (w, w, w)]
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        previous = widths[-1]
        for up_channels, skip_channels, out in plan:
            self.up.append(_up(previous, up_channels))
            self.merge.append(_double_conv(up_channels + skip_channels, out))
            previous = out
        self.head = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def _init_weights(module: nn.Module) -> None:
    """DRAEM's initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02) and zero bias."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------- Perlin noise


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    count: int, height: int, width: int, cells: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """`count` 2-D Perlin noise maps (count x height x width, roughly in [-1, 1]) with cells[0] x cells[1] lattice
    cells; vectorised over maps and pixels. Random gradient directions come from `generator`."""
    cells_y, cells_x = cells
    angles = 2 * math.pi * torch.rand(count, cells_y + 1, cells_x + 1, generator=generator)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # count x (cy+1) x (cx+1) x 2
    ys = torch.arange(height, dtype=torch.float32) * (cells_y / height)
    xs = torch.arange(width, dtype=torch.float32) * (cells_x / width)
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[:, (y0 + dy)[:, None], (x0 + dx)[None, :]]  # count x H x W x 2
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return math.sqrt(2) * torch.lerp(top, bottom, wy)


def _rotate(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate B x H x W maps about their centre; what comes in from outside is 0 (as imgaug's Affine)."""
    radians = degrees * math.pi / 180
    cos, sin = torch.cos(radians), torch.sin(radians)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], -1), torch.stack([sin, cos, zeros], -1)], dim=1)
    grid = F.affine_grid(theta, [maps.shape[0], 1, *maps.shape[-2:]], align_corners=False)
    return F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def perlin_masks(count: int, size: int, generator: torch.Generator, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """DRAEM's anomaly masks: count x size x size in {0, 1}. Per mask, Perlin noise with 2^a x 2^b cells
    (a, b in 0..5), rotated by an angle in (-90, 90) degrees, thresholded at `threshold`."""
    octaves = torch.randint(0, PERLIN_MAX_OCTAVE, (count, 2), generator=generator)
    degrees = torch.rand(count, generator=generator) * 180 - 90
    noise = torch.cat([perlin_noise(1, size, size, (2 ** int(a), 2 ** int(b)), generator) for a, b in octaves])
    return (_rotate(noise, degrees) > threshold).float()


# ----------------------------------------------------------------------------------------------- textures


def _uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def procedural_textures(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """count x 3 x size x size textures in [0, 1]: two random colours mixed by fractal Perlin noise (3 octaves),
    half of them multiplied by a random stripe or checker pattern. Stands in for DRAEM's DTD textures offline."""
    textures = []
    for _ in range(count):
        base = int(torch.randint(1, 4, (), generator=generator))
        noise = sum(
            perlin_noise(1, size, size, (2 ** (base + o), 2 ** (base + o)), generator)[0] / 2**o for o in range(3)
        )
        weight = torch.sigmoid(noise * float(_uniform((), 1.5, 4.0, generator)))
        colours = torch.rand(2, 3, 1, 1, generator=generator)
        texture = colours[0] * weight + colours[1] * (1 - weight)
        if float(torch.rand((), generator=generator)) < 0.5:
            y, x = torch.meshgrid(
                torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
            )
            angle = float(_uniform((), 0, math.pi, generator))
            period = float(_uniform((), 4, size / 4, generator))
            u = (x * math.cos(angle) + y * math.sin(angle)) / period
            v = (-x * math.sin(angle) + y * math.cos(angle)) / period
            checker = float(torch.rand((), generator=generator)) < 0.5
            pattern = ((u.floor() + v.floor()) % 2) if checker else (u.floor() % 2)
            texture = texture * (0.4 + 0.6 * pattern)
        textures.append(texture)
    return torch.stack(textures).clamp(0, 1)


def _colour_operations(textures: torch.Tensor, generator: torch.Generator, ops_per_texture: int = 3) -> torch.Tensor:
    """Three random operations per texture among DRAEM's kinds: gamma, brightness, hue shift (channel roll),
    solarize, posterize, invert, autocontrast. Works on B x 3 x H x W in [0, 1]."""
    out = []
    for texture in textures:
        for op in torch.randperm(7, generator=generator)[:ops_per_texture].tolist():
            if op == 0:
                texture = texture.clamp_min(1e-6) ** float(_uniform((), 0.5, 2.0, generator))
            elif op == 1:
                texture = texture * float(_uniform((), 0.8, 1.2, generator)) + float(_uniform((), -0.1, 0.1, generator))
            elif op == 2:
                texture = texture.roll(int(torch.randint(1, 3, (), generator=generator)), dims=0)
            elif op == 3:
                level = float(_uniform((), 0.3, 0.9, generator))
                texture = torch.where(texture > level, 1 - texture, texture)
            elif op == 4:
                levels = 2 ** int(torch.randint(2, 5, (), generator=generator))
                texture = torch.floor(texture * levels) / levels
            elif op == 5:
                texture = 1 - texture
            else:
                low = texture.amin(dim=(1, 2), keepdim=True)
                high = texture.amax(dim=(1, 2), keepdim=True)
                texture = (texture - low) / (high - low).clamp_min(1e-6)
            texture = texture.clamp(0, 1)
        out.append(texture)
    return torch.stack(out)


def synthesize_anomalies(
    clean: torch.Tensor, sources: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's training input: (augmented images B x 3 x S x S in [0, 1], masks B x S x S in {0, 1}).

    `clean` are the batch's images in [0, 1]; `sources` (uint8 N x 3 x S x S) the training set, from which other
    images are drawn as textures (else a procedural texture). Half the images (on average) stay clean, mask 0.
    """
    count, size = clean.shape[0], clean.shape[-1]
    masks = perlin_masks(count, size, generator)
    anomalous = torch.rand(count, generator=generator) < ANOMALY_PROBABILITY
    from_images = torch.rand(count, generator=generator) < TEXTURE_FROM_IMAGES
    picks = torch.randint(0, len(sources), (count,), generator=generator)
    textures = procedural_textures(count, size, generator)
    other = sources[picks].to(clean.device).float() / 255
    textures = torch.where(from_images.view(-1, 1, 1, 1).to(clean.device), other, textures.to(clean.device))
    textures = _colour_operations(textures, generator)
    beta = _uniform((count, 1, 1, 1), *BETA_RANGE, generator)
    masks = masks * anomalous.view(-1, 1, 1).float()
    m = masks.unsqueeze(1).to(clean.device)
    augmented = clean * (1 - m) + (1 - beta.to(clean.device)) * textures * m + beta.to(clean.device) * clean * m
    return augmented, masks.to(clean.device)


# ----------------------------------------------------------------------------------------------- losses


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Mean SSIM of images in [0, 1] (Gaussian window 11, sigma 1.5, zero padding as DRAEM's loss)."""
    channels = a.shape[1]
    window = _gaussian_window(window_size).to(a).expand(channels, 1, -1, -1)
    pad = window_size // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    covariance = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean()


def focal_loss(
    probabilities: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """DRAEM's focal loss on softmax probabilities (B x 2 x H x W) against masks (B x H x W in {0, 1}),
    with its label smoothing of the one-hot target."""
    target = torch.stack([1 - masks, masks], dim=1).clamp(smooth, 1 - smooth)
    pt = (target * probabilities).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


# ----------------------------------------------------------------------------------------------- the method


@dataclass
class DraemOptions:
    """DRAEM's sub-network widths: the reference's are 128 (reconstructive) and 64 (discriminative)."""

    reconstructive_width: int = 128
    discriminative_width: int = 64
    RANGES: ClassVar[dict[str, str]] = {"reconstructive_width": "[1, 1024]", "discriminative_width": "[1, 1024]"}


def _paper(settings) -> None:
    # DRAEM's own schedule (its train_DRAEM.py): Adam (AdamW without weight decay is Adam) lr 1e-4, batch 8,
    # 700 epochs, every lr x0.2 at 80% and 90% (on MVTec AD's 3629 training images mixed: 317,538 steps).
    # The wide_resnet50_2 encoder only feeds the aligner.
    settings.base = BaseTraining(
        iters=None, epochs=700, batch_size=8, lr=1e-4, weight_decay=0.0, lr_drop_at=[0.8, 0.9], lr_drop=0.2
    )


def _cpu(settings) -> None:
    # Full-resolution sub-networks dominate: widths 16 / 8 (reference 128 / 64) and DRAEM's batch of 8.
    # 400 iterations are ~0.1% of DRAEM's schedule, so the lr is raised to 1e-3 (drops kept at 80%, 90%).
    settings.draem = DraemOptions(reconstructive_width=16, discriminative_width=8)
    settings.base.batch_size, settings.base.lr = 8, 1e-3
    settings.base.iters, settings.base.epochs = 400, None  # a fixed budget: passes are not measured here


@METHODS.register("draem", options=DraemOptions, presets={"paper": _paper, "cpu": _cpu})
class DRAEM(BaseMethod):
    score_scale = 0.1  # the map is a probability in 0..1, like RevDist's cosine distances
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        backbone: str,
        image_size: int,
        pretrained: bool = True,
        weights_path: str | None = None,
        reconstructive_width: int = 128,
        discriminative_width: int = 64,
    ):
        super().__init__()
        # Frozen ImageNet encoder: only for the aligner (DRAEM itself has none).
        self.encoder = create_encoder(backbone, pretrained=pretrained, weights_path=weights_path, stages="revdist")
        self.reconstructive = ReconstructiveNetwork(reconstructive_width)
        self.discriminative = DiscriminativeNetwork(discriminative_width)
        self.reconstructive.apply(_init_weights)
        self.discriminative.apply(_init_weights)
        self.image_size = image_size
        self.align_channels = self.encoder.channels[-1]
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.reconstructive.parameters()) + list(self.discriminative.parameters())

    def segment(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (reconstruction, segmentation logits B x 2 x H x W)."""
        pixels = pixels.contiguous(memory_format=torch.channels_last)  # about 2x faster convolutions on CPU
        reconstruction = self.reconstructive(pixels)
        logits = self.discriminative(torch.cat([reconstruction, pixels], dim=1))
        return reconstruction.contiguous(), logits.contiguous()

    def forward(self, x: torch.Tensor) -> MethodOutput:
        pixels = x * self.pixel_std + self.pixel_mean  # DRAEM works on [0, 1] images
        anomaly_map = self.segment(pixels)[1].softmax(dim=1)[:, 1]
        return MethodOutput(anomaly_map, self.encoder(x)[-1])

    def objective(
        self, images: torch.Tensor, settings, generator: torch.Generator, cache_gib: float, trainer: Trainer
    ) -> tuple[list[dict], LossOf]:
        """Train both sub-networks on synthetic anomalies over normal uint8 images (N x 3 x S x S).

        Loss per batch: MSE + (1 - SSIM) of the reconstruction against the clean image, plus the focal loss of
        the segmentation against the synthetic mask. `cache_gib` is unused (there are no frozen features to keep).
        """
        device = next(self.reconstructive.parameters()).device

        def loss_of(iteration: int, batch: torch.Tensor) -> torch.Tensor:
            clean = images[batch].to(device).float() / 255
            augmented, masks = synthesize_anomalies(clean, images, generator)
            reconstruction, logits = self.segment(augmented)
            reconstruction_loss = F.mse_loss(reconstruction, clean) + (1 - ssim(reconstruction, clean))
            return reconstruction_loss + focal_loss(logits.softmax(dim=1), masks)

        return [{"params": self.trainable_parameters()}], loss_of
