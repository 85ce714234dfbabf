"""Loading data sets and folders: ``load(name, ...)`` returns a ``Dataset`` (``sources.py``).

``name`` is "sample" (the set shipped in the package), "fashion-mnist", "imagenette" or a folder: ``train/`` and
``val/`` folders of class folders, or one folder per class, split by ``curation.stratified_split``. Its parts are
class names, a train and a validation ``Source`` (and a test one for Fashion-MNIST), the preprocessing, and a
description of the split for ``split.json``. ``eval_source`` and ``validation_source`` find what ``eval`` measures.
"""

from __future__ import annotations

import gzip
import math
import os
from importlib import resources
from pathlib import Path

import torch

from .curation import stratified_split
from .files import find_files
from .preprocess import IMAGE_ERRORS, preprocess_for
from .sources import DataError, Dataset, FileSource, Skipped, Source, TensorSource, skip_reason


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist
FASHION_MNIST_STATS = {"mean": [0.2860] * 3, "std": [0.3530] * 3}
IMAGENET_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEFAULT_RESOLUTION = {"sample": 32, "fashion-mnist": 32, "imagenette": 160}
FOLDER_RESOLUTION = 224


def cache_dir() -> Path:
    """Where downloads and decoded caches go: $MOBILENET_FN_CACHE, else mobilenet-fn in $XDG_CACHE_HOME or
    ~/.cache. Never inside a data folder."""
    if os.environ.get("MOBILENET_FN_CACHE"):
        return Path(os.environ["MOBILENET_FN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mobilenet-fn"


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (the MNIST format), gzipped or not, as a uint8 tensor of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise DataError(f"{path}: truncated IDX file ({len(body)} bytes for shape {shape})")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _fashion_mnist_files(folder: Path) -> dict[str, Path] | None:
    names = {
        "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
    }
    found = {}
    for key, stem in names.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def fashion_mnist_arrays(download: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The four Fashion-MNIST arrays, from Debian's package when present, else downloaded by torchvision."""
    for folder in (*FASHION_MNIST_DIRS, cache_dir() / "FashionMNIST" / "raw"):
        files = _fashion_mnist_files(Path(folder))
        if files:
            return {k: read_idx(p) for k, p in files.items()}, str(folder)
    if not download:
        raise DataError("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or allow the download")
    from torchvision.datasets import FashionMNIST

    root = cache_dir()
    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return fashion_mnist_arrays(download=False)


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``folder`` (recursively, sorted) and the other files, hidden ones left out."""
    images, others = find_files(folder)
    return [folder / rel for rel in images], [folder / rel for rel in others]


def scan_folder(root: Path, classes: list[str] | None = None,
                ignored: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """An ImageFolder tree: (class names, [(path, label)]). ``classes`` fixes the label order (for val/). Files
    that are not images are appended to ``ignored`` when given."""
    folders = _class_folders(root)
    names = [p.name for p in folders]
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown)} are not among train/'s classes")
    else:
        classes = names
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for folder in folders:
        images, others = images_in(folder)
        samples += [(str(p), index[folder.name]) for p in images]
        if ignored is not None:
            ignored += [str(p) for p in others]
    return classes, samples


def _check_classes(root: Path, classes: list[str], samples: list) -> None:
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s); need at least 2 (one sub-folder per class)")
    counts = torch.bincount(torch.tensor([s[1] for s in samples], dtype=torch.long), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty:
        raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty)}")


def folder_dataset(root: str | Path, *, val_split: float, seed: int,
                   ignored: list[str] | None = None) -> tuple[list[str], FileSource, FileSource, dict]:
    """A user's folder: ``train/`` and ``val/`` ImageFolders, or one folder per class split (stratified, seeded).
    Files that are not images are appended to ``ignored`` when given."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: is a file; give a folder of class folders (or with train/ and val/)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train = scan_folder(root / "train", ignored=ignored)
        _check_classes(root / "train", classes, train)
        _, val = scan_folder(root / "val", classes, ignored)
        if not val:
            raise DataError(f"{root / 'val'}: no images found")
        split = {"kind": "folders", "root": str(root.resolve()), "train": "train", "val": "val"}
        return classes, FileSource(train, str(root / "train")), FileSource(val, str(root / "val")), split
    if not 0 < val_split < 1:
        raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
    classes, samples = scan_folder(root, ignored=ignored)
    if not samples:
        raise DataError(f"{root}: no images found (expected one sub-folder of images per class)")
    _check_classes(root, classes, samples)
    train_idx, val_idx = stratified_split(FileSource(samples).labels, val_split, seed)
    val = [samples[i] for i in val_idx.tolist()]
    split = {
        "kind": "split", "root": str(root.resolve()), "val_split": val_split, "seed": seed,
        "val": [os.path.relpath(p, root) for p, _ in val],
    }
    return classes, FileSource([samples[i] for i in train_idx.tolist()], str(root)), FileSource(val, str(root)), split


def sample_root() -> Path:
    """The embedded sample set (an ImageFolder with train/ and val/), shipped inside the package."""
    return Path(str(resources.files("mobilenet_fn.sample") / "sample"))


def _load_images(source: FileSource) -> tuple[TensorSource, list[str]]:
    """Decodes a small FileSource into memory: grayscale (N, 1, H, W) uint8 if every image is gray, else RGB."""
    from PIL import Image

    images, labels, skipped = [], [], []  # PIL images, to tell grey sets from colour ones
    for path, label in source.samples:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
            labels.append(label)
        except IMAGE_ERRORS as e:
            skipped.append(Skipped(path, skip_reason(e)))
    if not images:
        raise DataError("no readable images")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise DataError(f"images in memory must share one size, found {sorted(sizes)[:3]}")
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    w, h = images[0].size
    stack = torch.stack([
        torch.frombuffer(bytearray(im.convert(mode).tobytes()), dtype=torch.uint8).reshape(h, w, -1) for im in images
    ])  # (N, H, W, C)
    return TensorSource(stack.permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)), skipped


def load(
    name: str, *, resolution: int | None = None, val_split: float = 0.2, seed: int = 0, download: bool = True
) -> Dataset:
    """``name`` is "sample", "fashion-mnist", "imagenette" or a folder path. ``resolution`` defaults per data set."""
    res = resolution or DEFAULT_RESOLUTION.get(name, FOLDER_RESOLUTION)
    ignored: list[str] = []
    if name == "sample":
        root = sample_root()
        classes, train, val, split = folder_dataset(root, val_split=val_split, seed=seed)
        train_t, s1 = _load_images(train)
        val_t, s2 = _load_images(val)
        split = {"kind": "sample", "train": "train", "val": "val"}
        pre = preprocess_for(res, crop_pct=1.0, stats=FASHION_MNIST_STATS)
        return Dataset("sample", classes, train_t, val_t, pre, split, skipped=s1 + s2)
    if name == "fashion-mnist":
        arrays, where = fashion_mnist_arrays(download)
        labels = arrays["train_labels"].long()
        train_idx, val_idx = stratified_split(labels, 5000 / len(labels), seed=0)
        images = arrays["train_images"].unsqueeze(1)  # (N, 1, 28, 28)
        split = {"kind": "fashion-mnist", "source": where, "val_indices_of_train": val_idx.tolist(), "seed": 0}
        return Dataset(
            "fashion-mnist", list(FASHION_MNIST_CLASSES),
            TensorSource(images[train_idx], labels[train_idx]), TensorSource(images[val_idx], labels[val_idx]),
            preprocess_for(res, crop_pct=1.0, stats=FASHION_MNIST_STATS), split,
            test=TensorSource(arrays["test_images"].unsqueeze(1), arrays["test_labels"].long()),
        )
    if name == "imagenette":
        root = imagenette_root(download)
        _, train, val, split = folder_dataset(root, val_split=val_split, seed=seed, ignored=ignored)
        from torchvision.datasets import Imagenette

        names = dict(zip(Imagenette._WNID_TO_CLASS, (n[0] for n in Imagenette._WNID_TO_CLASS.values())))
        classes = [names.get(p.name, p.name) for p in _class_folders(root / "train")]
        split["kind"] = "imagenette"
        return Dataset("imagenette", classes, train, val, preprocess_for(res, crop_pct=0.875, stats=IMAGENET_STATS),
                       split, ignored=ignored)
    classes, train, val, split = folder_dataset(name, val_split=val_split, seed=seed, ignored=ignored)
    return Dataset(str(Path(name)), classes, train, val, preprocess_for(res, crop_pct=0.875, stats=IMAGENET_STATS),
                   split, ignored=ignored)


def imagenette_root(download: bool = True) -> Path:
    """Imagenette (160 px) in the cache folder, downloaded by torchvision the first time."""
    root = cache_dir() / "imagenette"
    folder = root / "imagenette2-160"
    if not (folder / "train").is_dir():
        if not download:
            raise DataError(f"Imagenette not found in {root}")
        from torchvision.datasets import Imagenette

        Imagenette(str(root), split="train", size="160px", download=True)
    return folder


def validation_source(split: dict, classes: list[str]) -> Source:
    """Rebuilds the validation set a run recorded in split.json (for ``eval`` without ``--data``)."""
    kind = split.get("kind")
    if kind == "sample":
        return load("sample").val
    if kind == "fashion-mnist":
        return load("fashion-mnist", download=False).val
    root = Path(split.get("root", ""))
    if not root.is_dir():
        raise DataError(f"the validation data recorded in the weights ({root}) is not on this machine")
    if kind in ("folders", "imagenette"):
        _, samples = scan_folder(root / split["val"], classes)
        return FileSource(samples, str(root / split["val"]))
    if kind == "split":
        index = {c: i for i, c in enumerate(classes)}
        samples = [(str(root / rel), index[Path(rel).parts[0]]) for rel in split["val"]]
        return FileSource(samples, str(root))
    raise DataError(f"unknown split kind {kind!r}")


def eval_source(name: str, classes: list[str]) -> Source:
    """What ``eval --data name`` measures, labelled in the order of ``classes`` (the weights'): the validation split
    of sample, imagenette and train/+val/ folders, Fashion-MNIST's test set, or every image of a class-folder tree."""
    if name in ("sample", "imagenette", "fashion-mnist"):
        dataset = load(name)
        source, its_classes = (dataset.test if name == "fashion-mnist" else dataset.val), dataset.classes
    else:
        root = Path(name).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        folder = root / "val" if (root / "val").is_dir() else root
        its_classes = [p.name for p in _class_folders(folder)]
        _, samples = scan_folder(folder, its_classes)
        if not samples:
            raise DataError(f"{root}: no images found")
        source = FileSource(samples, str(folder))
    return relabel(source, its_classes, classes, name)


def relabel(source: Source, its_classes: list[str], classes: list[str], name: str) -> Source:
    """``source`` (of the data set ``name``), labelled by ``its_classes``, relabelled in the order of ``classes``
    (the weights'); a DataError when the two differ."""
    if sorted(its_classes) != sorted(classes):
        missing = sorted(set(its_classes) ^ set(classes))[:5]
        raise DataError(f"{name}: its {len(its_classes)} classes do not match the weights' {len(classes)} "
                        f"(differing: {', '.join(missing)})")
    remap = torch.tensor([classes.index(n) for n in its_classes])
    if isinstance(source, TensorSource):
        return TensorSource(source.images, remap[source.labels], source.rows)
    return FileSource([(p, int(remap[label])) for p, label in source.samples], source.root)
