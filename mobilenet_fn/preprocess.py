"""The eval preprocessing: the dict that travels in weights files, and the one way it is applied.

    preprocess = {"resolution": 224, "resize": 256, "crop_pct": 0.875, "interpolation": "bilinear",
                  "mean": [...], "std": [...]}

Validation during training, ``eval`` and ``predict`` all go through ``resize_center_crop`` on uint8 images and
``normalize`` on their float version, so the same file gives the same tensor whichever command reads it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

# What Pillow raises for a file it cannot decode: damaged, truncated, not an image, or a decompression bomb.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def preprocess_for(resolution: int, *, crop_pct: float, stats: dict, interpolation: str = "bilinear") -> dict:
    """Eval preprocessing: resize the short side to resolution / crop_pct, centre-crop resolution, normalise."""
    return {
        "resolution": resolution,
        "resize": int(math.floor(resolution / crop_pct)),
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": list(stats["mean"]),
        "std": list(stats["std"]),
    }


def interpolation_mode(preprocess: dict):
    """torchvision's InterpolationMode for the file's "interpolation" (bicubic, else bilinear)."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if preprocess.get("interpolation") == "bicubic" else InterpolationMode.BILINEAR


def resize_center_crop(x: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """(..., C, H, W) uint8 images, one or a batch, on any device: the short side resized to ``resize`` (with
    antialiasing), then the centre ``resolution`` x ``resolution`` crop; uint8 out."""
    from torchvision.transforms.v2 import functional as TF

    if min(x.shape[-2:]) != preprocess["resize"]:
        x = TF.resize(x, [preprocess["resize"]], interpolation=interpolation_mode(preprocess), antialias=True)
    return TF.center_crop(x, [preprocess["resolution"]] * 2)


def normalize(x: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> normalised 3-channel float; grayscale is repeated to 3 channels."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(preprocess["mean"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(preprocess["std"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def model_input(x: torch.Tensor, preprocess: dict, *, channels_last: bool = False) -> torch.Tensor:
    """(N, C, H, W) uint8 (or float in [0, 1]) -> the normalised float batch the model takes, in the memory format
    asked for."""
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype()).div_(255)
    x = normalize(x, preprocess)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def read_rgb(path: str | Path) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 RGB tensor (grey, palette, alpha and CMYK converted by Pillow). Raises
    one of ``IMAGE_ERRORS`` for a file that cannot be read."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB"))


def eval_image(path: str | Path, preprocess: dict) -> torch.Tensor:
    """An image file, preprocessed for evaluation: (3, resolution, resolution) uint8."""
    return resize_center_crop(read_rgb(path), preprocess)
