"""Makes a folder of 224 x 224 colour JPEGs to measure folder training on: Fashion-MNIST pictures enlarged to
224 px (bicubic), tinted with a random colour per image, given a little sensor-like noise and saved at JPEG
quality 90, one sub-folder per class. Decoding such a file costs about what a 224 px photo costs.

    python bench/make_photo_folder.py /tmp/photos --per-class 400
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from mobilenet_fn.data import FASHION_MNIST_CLASSES, fashion_mnist_arrays


def photo(gray: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """One 28 x 28 grey picture as a ``size`` px colour photo-like image."""
    big = np.asarray(Image.fromarray(gray).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    tint = rng.uniform(0.3, 1.0, 3)
    background = rng.uniform(0.0, 0.35, 3)
    rgb = background + big[..., None] * (tint - background)
    rgb += rng.normal(0, 0.03, rgb.shape)  # noise: JPEG sizes like a photo's, not a flat drawing's
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists")
    arrays, _ = fashion_mnist_arrays(download=False)
    images, labels = arrays["train_images"].numpy(), arrays["train_labels"].numpy()
    rng = np.random.default_rng(args.seed)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        folder = args.out / name.replace("/", "-").replace(" ", "-").lower()
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == c)[: args.per_class]):
            photo(images[i], rng, args.size).save(folder / f"{k:05d}.jpg", quality=90)
    n = sum(1 for _ in args.out.rglob("*.jpg"))
    size = sum(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"{args.out}: {n} JPEGs in {len(FASHION_MNIST_CLASSES)} class folders, {size / n / 1024:.1f} KiB each")


if __name__ == "__main__":
    main()
