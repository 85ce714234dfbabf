"""Builds data/sample/ from Fashion-MNIST: an ImageFolder of 28x28 grayscale PNGs, train/ and val/.

    apt-get install -y dataset-fashion-mnist      # the idx files, MIT licence (Zalando SE)
    python data/make_sample.py                    # 400 training and 100 validation images per class

Training images come from Fashion-MNIST's training set, validation images from its test set, the first ones of
each class in file order, so the sample is the same on every machine.
"""

import argparse
from pathlib import Path

from PIL import Image

from mobilenet_fn.data import FASHION_MNIST_CLASSES, fashion_mnist_arrays

FOLDER_NAMES = [c.lower().replace("/", "_").replace(" ", "_").replace("-", "") for c in FASHION_MNIST_CLASSES]


def write_split(images, labels, per_class: int, out: Path) -> None:
    taken = [0] * len(FOLDER_NAMES)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        if taken[label] == per_class:
            continue
        folder = out / FOLDER_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:05d}.png", optimize=True)
        taken[label] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "sample")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.glob("*/*/*.png")):
        raise SystemExit(f"{args.out} already holds images; remove it first to rebuild the sample")
    arrays, _ = fashion_mnist_arrays(download=True)
    write_split(arrays["train_images"], arrays["train_labels"], args.train_per_class, args.out / "train")
    write_split(arrays["test_images"], arrays["test_labels"], args.val_per_class, args.out / "val")


if __name__ == "__main__":
    main()
