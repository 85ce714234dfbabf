"""The eval preprocessing: the dict that travels in weights files, and the one way it is applied.

    preprocess = {"resolution": 224, "resize": 256, "crop_pct": 0.875, "interpolation": "bilinear",
                  "mean": [...], "std": [...]}

Validation during training, ``eval`` and ``predict`` all go through ``resize_center_crop`` on uint8 images and
``normalize`` on their float version, so the same file gives the same tensor whichever command reads it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .resize import ORIENTATION_TAG, UPRIGHT, check_decoded_size, to_rgb
from .resize import MAX_DECODED_PIXELS, ImageTooLarge  # noqa: F401  (defined once, beside resize's decoding)

# What Pillow raises for a file it cannot decode: damaged, truncated, not an image, or a decompression bomb; and
# ImageTooLarge (a ValueError).
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


@dataclass(frozen=True)
class Layout:
    """The square training crops are drawn from: (3, side, side), the short side resized as evaluation resizes it
    (``side`` = the eval resize, never under the resolution), placed so that its centre ``crop`` is evaluation's.
    The decoded cache stores these squares; the loader workers of ``--cache off`` cut the same one from each file,
    so both paths crop from the same pixels."""

    side: int
    crop: int
    interpolation: str

    @classmethod
    def of(cls, preprocess: dict) -> "Layout":
        return cls(max(preprocess["resize"], preprocess["resolution"]), preprocess["resolution"],
                   preprocess.get("interpolation", "bilinear"))

    @property
    def row_bytes(self) -> int:
        return 3 * self.side * self.side


def _window_start(length: int, layout: Layout) -> int:
    """Where the window of ``layout.side`` starts along a side of ``length`` pixels, so that its centre crop
    (torchvision's rounding) falls where evaluation's centre crop of the whole side does."""
    def centre(outer: int, inner: int) -> int:
        return int(round((outer - inner) / 2.0))

    return min(max(centre(length, layout.crop) - centre(layout.side, layout.crop), 0), length - layout.side)


def fit(image: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image, on any device, as its (3, S, S) training square."""
    from torchvision.transforms.v2 import functional as TF

    if min(image.shape[-2:]) != layout.side:  # the resize evaluation does (resize_center_crop)
        image = TF.resize(image, [layout.side], interpolation=interpolation_mode(
            {"interpolation": layout.interpolation}), antialias=True)
    h, w = image.shape[-2:]
    top, left = _window_start(h, layout), _window_start(w, layout)
    return image[:, top: top + layout.side, left: left + layout.side]


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


def read_rgb(path: str | Path, short_side: int | None = None) -> torch.Tensor:
    """An image file as an upright (3, H, W) uint8 RGB tensor, converted as ``resize`` converts it: turned by its
    EXIF orientation, 16-bit keeping its high byte, transparency onto white, CMYK, palette and grey to RGB; the
    first frame of an animation. Raises one of ``IMAGE_ERRORS`` for a file that cannot be read, ``ImageTooLarge``
    past ``MAX_DECODED_PIXELS``.

    ``short_side``: the least short side the caller needs. A JPEG larger than twice that is decoded from its draft
    (libjpeg's 1/2, 1/4 or 1/8 scale) with a short side of at least ``short_side``: much less memory and time, and
    pixels that differ slightly from a full decode followed by the same resize.
    """
    from torchvision.transforms.v2.functional import pil_to_tensor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_DECODED_PIXELS is the bound here
        with Image.open(path) as im:
            w, h = im.size
            if short_side and min(w, h) >= 2 * short_side:
                scale = short_side / min(w, h)
                im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))  # JPEG only; else a no-op
            check_decoded_size(im)
            im.load()
            orientation = im.getexif().get(ORIENTATION_TAG, 1)  # after the check: a PNG's getexif() decodes it
            rgb = to_rgb(im)
    if orientation in UPRIGHT:
        rgb = rgb.transpose(UPRIGHT[orientation])
    return pil_to_tensor(rgb)


def eval_image(path: str | Path, preprocess: dict) -> torch.Tensor:
    """An image file, preprocessed for evaluation: (3, resolution, resolution) uint8. A large JPEG is decoded
    from its draft, no smaller than the resize needs."""
    return resize_center_crop(read_rgb(path, preprocess["resize"]), preprocess)
