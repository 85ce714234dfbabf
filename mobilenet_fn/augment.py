"""Augmentation of whole batches on the device, each image with its own random parameters.

torchvision's v2 transforms draw one set of parameters per call, which is right for a DataLoader worker holding one
image and wasteful for a batch already on the device. The ops here take a parameter per image and do the work of
torchvision's per-image op for every image at once; ``tests/test_augment.py`` checks each against that op, given
the same parameters. The order is timm's and torchvision's: random resized crop and flip, an automatic policy
(TrivialAugment-Wide), normalisation, random erasing, then mixup/cutmix of the batch.

    spec = Augment(auto_augment="trivial", reprob=0.25, mixup=0.2, cutmix=1.0)
    x, y = augment_batch(images_uint8, labels, preprocess, spec, num_classes=10, generator=g)

Every draw comes from ``generator`` (seeded by the caller from seed, epoch and batch), so a resumed run draws the
same parameters. ``y`` comes back as class probabilities (N, classes) when mixup or cutmix is on, else as labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .options import CROP_SCALE
from .preprocess import model_input

CROP_AREA = (CROP_SCALE, 1.0)  # a random resized crop's share of the image's area
CROP_RATIO = (3 / 4, 4 / 3)
ERASE_SCALE = (0.02, 1 / 3)  # timm's RandomErasing defaults: area fraction and aspect ratio of the box
ERASE_RATIO = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10
CUTMIX_SWITCH = 0.5  # with both on, the share of images that get cutmix rather than mixup (timm's switch_prob)


@dataclass(frozen=True)
class Augment:
    """What is done to a training batch. ``crop_flip``: random resized crop and horizontal flip; ``crop_scale``:
    the least share of the image's area a crop holds (timm's ``--scale`` lower bound; the upper is 1);
    ``auto_augment``: "trivial" (TrivialAugment-Wide, Müller & Hutter 2021) or "none"; ``reprob``: the probability
    that an image gets a random-erasing box of normal noise (timm's mode "pixel"); ``mixup``, ``cutmix``: the alpha
    of the Beta distribution each image's mixing weight is drawn from (0: off)."""

    crop_flip: bool = True
    crop_scale: float = CROP_SCALE
    auto_augment: str = "none"
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


# ---------------------------------------------------------------------------------------------------------------
# Random resized crop and flip


def crop_boxes(n: int, generator: torch.Generator, scale: tuple[float, float] = CROP_AREA,
               device=None) -> tuple[torch.Tensor, ...]:
    """``n`` random resized crops as (w, h, cx, cy): width and height as shares of the image's sides, the centre in
    grid_sample's [-1, 1]. The area's share is drawn from ``scale`` and the aspect ratio log-uniformly from
    CROP_RATIO; a side that would leave the image is clamped to it (torchvision redraws such a crop instead, which
    leans towards smaller crops). The batched crop and the loader workers' both draw here."""
    area = torch.empty(n, device=device).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]),
                                                       generator=generator)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - h)
    return w, h, cx, cy


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator, flip: bool = True,
                        scale: tuple[float, float] = CROP_AREA) -> torch.Tensor:
    """Per-image random resized crop (and horizontal flip) of a (N, C, H, W) float batch, as one grid_sample: each
    crop holds a share of the area drawn from ``scale``."""
    n = x.shape[0]
    dev = x.device
    w, h, cx, cy = crop_boxes(n, generator, scale, dev)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(torch.rand(n, device=dev, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop_one(image: torch.Tensor, size: int, generator: torch.Generator,
                            scale: tuple[float, float] = CROP_AREA, interpolation=None) -> torch.Tensor:
    """One (C, H, W) image's random resized crop and flip, for a loader worker: the crop ``crop_boxes`` draws (the
    batched crop's distribution, rounded to whole pixels), resized by torchvision with antialiasing."""
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    w, h, cx, cy = (float(t) for t in crop_boxes(1, generator, scale))
    crop_w, crop_h = max(1, round(w * width)), max(1, round(h * height))
    left = min(max(round((cx + 1) / 2 * width - crop_w / 2), 0), width - crop_w)
    top = min(max(round((cy + 1) / 2 * height - crop_h / 2), 0), height - crop_h)
    out = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True,
                          interpolation=interpolation or TF.InterpolationMode.BILINEAR)
    return TF.horizontal_flip(out) if torch.rand(1, generator=generator).item() < 0.5 else out


# ---------------------------------------------------------------------------------------------------------------
# TrivialAugment-Wide: one op per image from torchvision's TrivialAugmentWide space, at one of 31 magnitudes

TRIVIAL_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
               "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
TRIVIAL_BINS = 31
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def trivial_magnitude(op: str, level: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The magnitude of ``op`` at bin ``level`` (0..30), as torchvision's TrivialAugmentWide space defines it
    (translation in pixels, rotation in degrees, posterize in bits), negated where ``negative`` for signed ops."""
    top = {"ShearX": 0.99, "ShearY": 0.99, "TranslateX": 32.0, "TranslateY": 32.0, "Rotate": 135.0,
           "Brightness": 0.99, "Color": 0.99, "Contrast": 0.99, "Sharpness": 0.99}
    level = level.to(torch.get_default_dtype())
    if op == "Posterize":
        return (8 - level / ((TRIVIAL_BINS - 1) / 6)).round()
    if op == "Solarize":
        return 1.0 - level / (TRIVIAL_BINS - 1)
    magnitude = level * (top.get(op, 0.0) / (TRIVIAL_BINS - 1))
    return torch.where(negative, -magnitude, magnitude) if op in _SIGNED else magnitude


def inverse_affine(angle, translate_x, translate_y, shear_x, shear_y, center_x, center_y) -> torch.Tensor:
    """(N, 2, 3) inverse affine matrices in pixels about the image centre, each argument a (N,) tensor (degrees,
    pixels): the matrix torchvision's ``_get_inverse_affine_matrix`` computes for one image, at scale 1."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    px, py = center_x + translate_x, center_y + translate_y
    row0 = torch.stack([d, -b, center_x - d * px + b * py], dim=1)
    row1 = torch.stack([-c, a, center_y + c * px - a * py], dim=1)
    return torch.stack([row0, row1], dim=1)


def warp(x: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Each image of (N, C, H, W) ``x`` resampled through its inverse affine ``matrix`` (N, 2, 3), zeros outside,
    with the pixel grid torchvision's affine uses (so that the same matrix gives the same pixels)."""
    n, _, h, w = x.shape
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=x.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], dim=-1)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    grid = base.reshape(1, h * w, 3) @ (matrix.to(x.dtype).transpose(1, 2) / scale)  # (N, H*W, 2)
    return F.grid_sample(x, grid.reshape(n, h, w, 2), mode=mode, padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of an RGB or grey batch (ITU-R 601-2, as torchvision)."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp(0, 1)


def _sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness: a blend with the 3x3 smoothed image inside a one-pixel border."""
    c = x.shape[1]
    kernel = torch.full((3, 3), 1 / 13, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5 / 13
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    out[..., 1:-1, 1:-1] = _blend(x[..., 1:-1, 1:-1], smooth, factor)
    return out


def trivial_op(op: str, x: torch.Tensor, magnitude: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``op`` of TrivialAugment-Wide on a (N, C, H, W) float batch in [0, 1], image i at ``magnitude[i]``; what
    torchvision's TrivialAugmentWide does to one image for that op and magnitude."""
    from torchvision.transforms.v2 import functional as TF

    n, _, h, w = x.shape
    zero = torch.zeros(n, device=x.device, dtype=magnitude.dtype)
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        angle, tx, ty, shx, shy, cx, cy = (zero,) * 7
        if op in ("ShearX", "ShearY"):  # sheared about the top-left corner, as AutoAugment does
            shear = torch.rad2deg(torch.atan(magnitude))
            shx, shy = (shear, zero) if op == "ShearX" else (zero, shear)
            cx, cy = zero - w * 0.5, zero - h * 0.5
        elif op == "TranslateX":
            tx = magnitude.trunc()
        elif op == "TranslateY":
            ty = magnitude.trunc()
        else:
            angle = -magnitude  # torchvision's rotate is counter-clockwise
        return warp(x, inverse_affine(angle, tx, ty, shx, shy, cx, cy), mode)
    if op == "Brightness":
        return _blend(x, torch.zeros_like(x), 1 + magnitude)
    if op == "Color":
        return x if x.shape[1] == 1 else _blend(x, _gray(x), 1 + magnitude)
    if op == "Contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), 1 + magnitude)
    if op == "Sharpness":
        return x if h <= 2 or w <= 2 else _sharpen(x, 1 + magnitude)
    if op == "Posterize":
        levels = (2 ** magnitude).view(-1, 1, 1, 1)
        return (x * levels).floor().clamp(min=0).minimum(levels - 1) / levels
    if op == "Solarize":
        return torch.where(x >= magnitude.view(-1, 1, 1, 1), 1 - x, x)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    return x


def trivial_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugment-Wide on a (N, C, H, W) float batch in [0, 1]: each image draws one op, a magnitude bin and a
    sign, as torchvision's TrivialAugmentWide does for one image."""
    n, dev = x.shape[0], x.device
    ops = torch.randint(len(TRIVIAL_OPS), (n,), device=dev, generator=generator)
    levels = torch.randint(TRIVIAL_BINS, (n,), device=dev, generator=generator)
    negative = torch.rand(n, device=dev, generator=generator) <= 0.5
    out = x.clone()
    for k, op in enumerate(TRIVIAL_OPS[1:], start=1):
        rows = (ops == k).nonzero().flatten()
        if len(rows):
            magnitude = trivial_magnitude(op, levels[rows], negative[rows])
            out[rows] = trivial_op(op, x[rows], magnitude)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Random erasing (Zhong et al. 2017) as timm does it: one box of normal noise on the normalised image


def erase_boxes(n: int, h: int, w: int, probability: float, generator: torch.Generator,
                device=None) -> torch.Tensor:
    """(N, 4) boxes (top, left, height, width) for random erasing, height 0 where an image is not erased: with
    ``probability``, the first of ten draws of area and aspect ratio that fits inside the image."""
    area = torch.empty(n, ERASE_ATTEMPTS, device=device).uniform_(*ERASE_SCALE, generator=generator) * (h * w)
    log_ratio = torch.empty(n, ERASE_ATTEMPTS, device=device).uniform_(
        math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), generator=generator)
    bh = (area * log_ratio.exp()).sqrt().round().long()
    bw = (area / log_ratio.exp()).sqrt().round().long()
    fits = (bh < h) & (bw < w)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none, masked below)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    chosen = fits.any(dim=1) & (torch.rand(n, device=device, generator=generator) < probability)
    top = (torch.rand(n, device=device, generator=generator) * (h - bh + 1)).long()
    left = (torch.rand(n, device=device, generator=generator) * (w - bw + 1)).long()
    return torch.stack([top, left, torch.where(chosen, bh, 0), torch.where(chosen, bw, 0)], dim=1)


def erase(x: torch.Tensor, boxes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's box (top, left, height, width) replaced by ``values`` (N, C, H, W)
    there: torchvision's ``erase`` for every image at once."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left, bh, bw = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)  # (N, H, W)
    return torch.where(inside.unsqueeze(1), values, x)


def random_erase(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing of a normalised (N, C, H, W) batch: boxes from ``erase_boxes``, filled with N(0, 1) noise."""
    n, _, h, w = x.shape
    boxes = erase_boxes(n, h, w, probability, generator, x.device)
    noise = torch.empty_like(x).normal_(generator=generator)
    return erase(x, boxes, noise)


# ---------------------------------------------------------------------------------------------------------------
# Mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019), per image, each mixed with its mirror in the batch


def cutmix_boxes(lam: torch.Tensor, h: int, w: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes (top, left, height, width) of side sqrt(1 - lam) centred at (cy, cx) and clipped to the image:
    timm's ``rand_bbox`` for given centres."""
    cut = (1 - lam.double()).sqrt()  # float64, as timm's numpy: a side of 25.9999 and 26.0 truncate apart
    cut_h, cut_w = (h * cut).long(), (w * cut).long()
    top, bottom = (cy - cut_h // 2).clamp(0, h), (cy + (cut_h + 1) // 2).clamp(0, h)
    left, right = (cx - cut_w // 2).clamp(0, w), (cx + (cut_w + 1) // 2).clamp(0, w)
    return torch.stack([top, left, bottom - top, right - left], dim=1)


def mix_params(n: int, h: int, w: int, mixup: float, cutmix: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam, boxes) for ``mix``: each image's weight of its own pixels and label, and its cutmix box (height 0 for
    mixup). Drawn on the CPU from a seed that ``generator`` gives: torch's own generators for the switch and the box
    centres, numpy's for the Beta weights (torch's Beta sampling takes no generator, and its global one is shared
    with the thread that runs the step, whose dropout draws from it while this runs in the batch thread)."""
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    cpu, beta = torch.Generator().manual_seed(seed), np.random.default_rng(seed).beta
    use_cut = (torch.rand(n, generator=cpu) < (CUTMIX_SWITCH if mixup > 0 else 1.0) if cutmix > 0
               else torch.zeros(n, dtype=torch.bool))
    lam_mix = torch.from_numpy(beta(mixup, mixup, n)).float() if mixup > 0 else torch.ones(n)
    lam_cut = torch.from_numpy(beta(cutmix, cutmix, n)).float() if cutmix > 0 else torch.ones(n)
    cy, cx = torch.randint(h, (n,), generator=cpu), torch.randint(w, (n,), generator=cpu)
    boxes = cutmix_boxes(lam_cut, h, w, cy, cx)
    boxes[~use_cut, 2:] = 0
    area = (boxes[:, 2] * boxes[:, 3]).to(lam_mix.dtype)
    lam = torch.where(use_cut, 1 - area / (h * w), lam_mix)  # cutmix: the share of pixels actually kept
    return lam, boxes


def mix(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor,
        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i mixed with image N-1-i (timm's per-element mode): blended with weight ``lam[i]`` where its box is
    empty (mixup), else the box pasted from the partner (cutmix). Targets: lam one-hot(y) + (1 - lam) one-hot of the
    partner; label smoothing is then applied by the loss, which composes as timm's ``mixup_target``."""
    lam = lam.to(x.device, x.dtype)
    boxes = boxes.to(x.device)
    partner = x.flip(0)
    blended = x * lam.view(-1, 1, 1, 1) + partner * (1 - lam.view(-1, 1, 1, 1))
    pasted = erase(x, boxes, partner)
    out = torch.where((boxes[:, 2] > 0).view(-1, 1, 1, 1), pasted, blended)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return out, onehot * lam[:, None] + onehot.flip(0) * (1 - lam[:, None])


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline


def augment_batch(x: torch.Tensor, y: torch.Tensor, preprocess: dict, spec: Augment, *, num_classes: int,
                  generator: torch.Generator, on_device: bool = True,
                  channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: (N, C, H, W) uint8 images and (N,) labels on the device -> the normalised float batch the
    model takes and its targets (labels, or probabilities (N, classes) when mixing). ``on_device=False``: the
    per-image part (crop, flip, auto-augment) was done already, by torchvision in the loader's workers."""
    x = x.to(torch.get_default_dtype()).div_(255)
    if on_device and spec.crop_flip:
        x = random_resized_crop(x, preprocess["resolution"], generator, scale=(spec.crop_scale, 1.0))
    if on_device and spec.auto_augment == "trivial":
        x = trivial_augment(x, generator)
    x = model_input(x, preprocess)
    if spec.reprob > 0:
        x = random_erase(x, spec.reprob, generator)
    if spec.mixes:
        lam, boxes = mix_params(len(y), x.shape[2], x.shape[3], spec.mixup, spec.cutmix, generator)
        x, y = mix(x, y, lam, boxes, num_classes)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), y
