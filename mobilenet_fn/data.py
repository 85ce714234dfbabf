"""Datasets and transforms.

``load(name_or_path, ...)`` returns a ``Dataset``: class names, a train and a validation ``Source`` (and a test one
for Fashion-MNIST), the preprocessing, and a description of the split for ``split.json``. A source is either a
``TensorSource`` (uint8 images held in memory, or a folder's decoded cache (``cache.py``), augmented per batch on
the device) or a ``FileSource`` (image files streamed through a DataLoader with workers, for ``--cache off``;
unreadable files are skipped and counted).
``batches(...)`` turns a source into normalised (N, 3, R, R) float batches on the device.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from .augment import Augment, augment_batch, random_resized_crop_one
from .files import find_files
from .preprocess import (
    IMAGE_ERRORS, Layout, eval_image, fit, interpolation_mode, model_input, preprocess_for, read_rgb,
    resize_center_crop,
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist
FASHION_MNIST_STATS = {"mean": [0.2860] * 3, "std": [0.3530] * 3}
IMAGENET_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DEFAULT_RESOLUTION = {"sample": 32, "fashion-mnist": 32, "imagenette": 160}
FOLDER_RESOLUTION = 224


class DataError(ValueError):
    """Bad data given by the user: the message says what is wrong and what to do."""


class Skipped(str):
    """An unreadable file as the skip lists hold it: the string "path: reason", with ``.path`` and ``.reason``."""

    def __new__(cls, path, reason: str):
        self = super().__new__(cls, f"{path}: {reason}")
        self.path, self.reason = str(path), reason
        return self

    def __reduce__(self):  # across DataLoader workers and processes
        return Skipped, (self.path, self.reason)


def skip_reason(error: Exception) -> str:
    return str(error) or type(error).__name__


def cache_dir() -> Path:
    """Where downloads and decoded caches go: $MOBILENET_FN_CACHE, else mobilenet-fn in $XDG_CACHE_HOME or
    ~/.cache. Never inside a data folder."""
    if os.environ.get("MOBILENET_FN_CACHE"):
        return Path(os.environ["MOBILENET_FN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mobilenet-fn"


@dataclass
class TensorSource:
    images: torch.Tensor  # (M, C, H, W) uint8, in memory or memory-mapped (a decoded cache)
    labels: torch.Tensor  # (N,) int64
    rows: torch.Tensor | None = None  # (N,) int64: the row of ``images`` of each item; None: row i is item i

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (uint8) and labels of ``items``, on the device their tensors are on."""
        return self.images[items if self.rows is None else self.rows[items]], self.labels[items]


@dataclass
class FileSource:
    samples: list[tuple[str, int]]  # (path, label)
    root: str | None = None  # the folder of class folders the files come from (what a decoded cache covers)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)


Source = TensorSource | FileSource


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Source
    val: Source
    preprocess: dict
    split: dict  # what split.json records: where the data came from and which part is validation
    test: Source | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable images
    ignored: list[str] = field(default_factory=list)  # files in the class folders that are not images


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (the MNIST format), gzipped or not, as a uint8 tensor of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
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


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): each class contributes round(n_class * val_fraction) validation items, at least one."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = max(1, round(len(idx) * val_fraction))
        if n_val >= len(idx):
            raise DataError(f"class {c} has {len(idx)} image(s): too few to hold out a validation split")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


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
    data: str, *, resolution: int | None = None, val_split: float = 0.2, seed: int = 0, download: bool = True
) -> Dataset:
    """``data`` is "sample", "fashion-mnist", "imagenette" or a folder path. ``resolution`` defaults per data."""
    res = resolution or DEFAULT_RESOLUTION.get(data, FOLDER_RESOLUTION)
    ignored: list[str] = []
    if data == "sample":
        root = sample_root()
        classes, train, val, split = folder_dataset(root, val_split=val_split, seed=seed)
        train_t, s1 = _load_images(train)
        val_t, s2 = _load_images(val)
        split = {"kind": "sample", "train": "train", "val": "val"}
        pre = preprocess_for(res, crop_pct=1.0, stats=FASHION_MNIST_STATS)
        return Dataset("sample", classes, train_t, val_t, pre, split, skipped=s1 + s2)
    if data == "fashion-mnist":
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
    if data == "imagenette":
        root = imagenette_root(download)
        _, train, val, split = folder_dataset(root, val_split=val_split, seed=seed, ignored=ignored)
        from torchvision.datasets import Imagenette

        names = dict(zip(Imagenette._WNID_TO_CLASS, (n[0] for n in Imagenette._WNID_TO_CLASS.values())))
        classes = [names.get(p.name, p.name) for p in _class_folders(root / "train")]
        split["kind"] = "imagenette"
        return Dataset("imagenette", classes, train, val, preprocess_for(res, crop_pct=0.875, stats=IMAGENET_STATS),
                       split, ignored=ignored)
    classes, train, val, split = folder_dataset(data, val_split=val_split, seed=seed, ignored=ignored)
    return Dataset(str(Path(data)), classes, train, val, preprocess_for(res, crop_pct=0.875, stats=IMAGENET_STATS),
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


def eval_source(data: str, classes: list[str]) -> Source:
    """What ``eval --data`` measures, labelled in the order of ``classes`` (the weights'): the validation split of
    sample, imagenette and train/+val/ folders, Fashion-MNIST's test set, or every image of a class-folder tree."""
    if data in ("sample", "imagenette", "fashion-mnist"):
        ds = load(data)
        source, names = (ds.test if data == "fashion-mnist" else ds.val), ds.classes
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        folder = root / "val" if (root / "val").is_dir() else root
        names = [p.name for p in _class_folders(folder)]
        _, samples = scan_folder(folder, names)
        if not samples:
            raise DataError(f"{root}: no images found")
        source = FileSource(samples, str(folder))
    return relabel(source, names, classes, data)


def relabel(source: Source, names: list[str], classes: list[str], data: str) -> Source:
    """``source``, labelled by ``names``, relabelled in the order of ``classes`` (the weights'); a DataError when
    the two differ."""
    if sorted(names) != sorted(classes):
        missing = sorted(set(names) ^ set(classes))[:5]
        raise DataError(f"{data}: its {len(names)} classes do not match the weights' {len(classes)} (differing: "
                        f"{', '.join(missing)})")
    remap = torch.tensor([classes.index(n) for n in names])
    if isinstance(source, TensorSource):
        return TensorSource(source.images, remap[source.labels], source.rows)
    return FileSource([(p, int(remap[label])) for p, label in source.samples], source.root)


# ---------------------------------------------------------------------------------------------------------------
# Transforms and batches


def _auto_augment(spec: Augment):
    """The worker's automatic policy for ``spec``, torchvision's own; None when there is none."""
    from torchvision.transforms import v2

    return v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR) if spec.auto_augment == "trivial" \
        else None


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation in one epoch: a function of the item, not of the worker, process or
    position that happens to load it, so a resumed or re-sharded run draws the same crops."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63  # what a torch.Generator takes


class _Files(torch.utils.data.Dataset):
    """Image files as uint8 (3, R, R) tensors, each item a (source index, path, label); an unreadable file gives
    (None, Skipped), which the collate drops. Training crops are drawn from the square the decoded cache would
    store (``preprocess.Layout``), so ``--cache off`` trains on the same pixels as the cache. ``augment`` = (seed,
    epoch, spec) does the per-image part of the ``Augment`` spec (crop, flip, auto-augment), drawn from the item's
    own seed; None gives the eval preprocessing."""

    def __init__(self, items, preprocess: dict, augment: tuple[int, int, Augment] | None):
        self.items, self.preprocess, self.augment = items, preprocess, augment
        self.window, self.interpolation = Layout.of(preprocess), interpolation_mode(preprocess)
        self.auto_augment = _auto_augment(augment[2]) if augment else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        index, path, label = self.items[i]
        spec = self.augment[2] if self.augment else None
        try:
            if spec is None or not spec.crop_flip:
                image = eval_image(path, self.preprocess)
            else:
                image = fit(read_rgb(path, self.window.side), self.window)
        except IMAGE_ERRORS as e:
            return None, Skipped(path, skip_reason(e))
        if spec is None:
            return image, label
        seed = item_seed(*self.augment[:2], index)
        if spec.crop_flip:
            image = random_resized_crop_one(image, self.preprocess["resolution"], torch.Generator().manual_seed(seed),
                                            scale=(spec.crop_scale, 1.0), interpolation=self.interpolation)
        if self.auto_augment is None:
            return image, label
        # torchvision draws from the global CPU RNG: seed it for this item, and give the caller's state back.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.auto_augment(image), label


def _collate(items):
    good = [(x, y) for x, y in items if x is not None]
    bad = [p for x, p in items if x is None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


@dataclass
class Batch:
    x: torch.Tensor  # (N, 3, R, R) normalised float on the device
    y: torch.Tensor  # (N,) int64 on the device
    skipped: list[str]  # unreadable files met while making this batch, as Skipped ("path: reason")


def order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of an epoch: a permutation drawn from (seed, epoch), so a resumed run repeats it."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# A TensorSource larger than this (a big decoded cache) stays in host memory on CUDA: each batch is gathered into
# pinned memory and copied while the previous step runs. Smaller ones (Fashion-MNIST: 47 MB) move to the GPU whole.
DEVICE_RESIDENT_BYTES = 2 << 30


def _pinned_gathers(source: TensorSource, items: list[torch.Tensor], device: torch.device):
    """Yields (images, labels) on ``device`` for each index tensor of ``items``: gathered on the CPU into one of two
    pinned buffers and copied on a side stream, one batch ahead, so the copy overlaps the step the caller runs
    on the batch before. A buffer is refilled only once its previous copy has finished."""
    copy_stream = torch.cuda.Stream(device)
    buffers, copied = [], [None, None]  # copied[k]: the event that marks the end of buffer k's last copy
    ready = None
    for n, j in enumerate(items + [None]):
        if j is not None:
            k = n % 2
            if len(buffers) <= k:
                buffers.append(torch.empty((len(j), *source.images.shape[1:]), dtype=torch.uint8,
                                           pin_memory=True))
            if copied[k] is not None:
                copied[k].synchronize()
            rows = j if source.rows is None else source.rows[j]
            host = torch.index_select(source.images, 0, rows, out=buffers[k][:len(j)])
            labels = source.labels[j].pin_memory()
            with torch.cuda.stream(copy_stream):
                x, y = host.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                copied[k] = torch.cuda.Event()
                copied[k].record(copy_stream)
            following = (x, y, copied[k])
        else:
            following = None
        if ready is not None:
            x, y, done = ready
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            x.record_stream(current)  # allocated on the copy stream, used on this one
            y.record_stream(current)
            yield x, y
        ready = following


OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")  # GNU (pip wheels), Intel (conda), LLVM


def threads_in_this_thread(count: int) -> bool:
    """Runs the calling thread's torch ops on ``count`` cores, leaving the other threads as they are. OpenMP keeps
    the thread count per thread, but ``torch.set_num_threads`` also changes the default every later thread starts
    with (and clears oneDNN's cache while the step may be using it), so this sets OpenMP's own per-thread value
    in the runtimes loaded (GNU's, Intel's or LLVM's, found in /proc/self/maps; each keeps its own). False where
    that does not reach torch's (no /proc on macOS and Windows): nothing changes."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps if any(f"/{lib}" in line for lib in OPENMP_LIBRARIES)}
    except OSError:
        return False
    torch.get_num_threads()  # torch sets a thread's count from its default on the thread's first op: do that first
    for path in runtimes:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).omp_set_num_threads(count)
    return torch.get_num_threads() == count


def made_ahead(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches``, each made in a background thread while the caller uses the one before: on the CPU the
    augmentation of batch i + 1 runs during the step on batch i (torch's ops release the GIL). The thread runs on a
    quarter of the step's cores (at least one) rather than on all of them: on 2 cores a cached folder trained faster
    with one than with two (``bench/folder_cache.py``; more cores are not measured). Each batch draws from its own
    generator, so the batches are the same as made in line."""
    cores = max(1, torch.get_num_threads() // 4)
    with ThreadPoolExecutor(1, "mobilenet-fn-batches", threads_in_this_thread, (cores,)) as pool:
        following = pool.submit(next, batches, None)
        while (batch := following.result()) is not None:
            following = pool.submit(next, batches, None)
            yield batch


def batches(
    source: Source, preprocess: dict, *, batch_size: int, train: bool, augment: Augment | None = Augment(),
    num_classes: int | None = None, device="cpu", seed: int = 0, epoch: int = 0, start: int = 0,
    workers: int = 0, shard: tuple[int, int] = (0, 1), channels_last: bool = False,
) -> Iterator[Batch]:
    """Yields the batches of one epoch from batch index ``start`` on.

    Training shuffles with (seed, epoch) and drops the last partial batch (so a compiled step sees one shape);
    evaluation keeps every item in order. ``shard=(rank, world)`` takes every world-th item for rank. Training
    batches are augmented as ``augment`` says (None: not at all): in-memory sources wholly on the device, file
    sources per image in the workers (crop, flip, auto-augment) and then on the device (erasing, mixing). With
    mixup or cutmix, ``y`` holds probabilities over ``num_classes``.
    """
    device = torch.device(device)
    idx = order(len(source), shuffle=train, seed=seed, epoch=epoch)
    rank, world = shard
    if world > 1:
        usable = len(idx) - len(idx) % world if train else len(idx)
        idx = idx[:usable][rank::world]
    n_batches = len(idx) // batch_size if train else math.ceil(len(idx) / batch_size)

    augment = augment if train else None
    in_memory = isinstance(source, TensorSource)

    def finish(x: torch.Tensor, y: torch.Tensor, i: int, skipped: list) -> Batch:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 10_007 + i)
            if in_memory and not augment.crop_flip:
                x = resize_center_crop(x, preprocess)
            x, y = augment_batch(x, y, preprocess, augment, num_classes=num_classes, generator=g,
                                 on_device=in_memory, channels_last=channels_last)
            return Batch(x, y, skipped)
        if in_memory:
            x = resize_center_crop(x, preprocess)
        return Batch(model_input(x, preprocess, channels_last=channels_last), y, skipped)

    if isinstance(source, TensorSource):
        streamed = device.type == "cuda" and source.images.nbytes > DEVICE_RESIDENT_BYTES
        if device.type == "cuda" and not streamed:  # small enough to hold on the GPU: gathered there
            source = TensorSource(*(t if t is None else t.to(device) for t in (
                source.images, source.labels, source.rows)))
            idx = idx.to(device)
        items = [idx[i * batch_size: (i + 1) * batch_size] for i in range(start, n_batches)]
        gathered = _pinned_gathers(source, items, device) if streamed else map(source.gather, items)
        made = (finish(x, y, i, []) for i, (x, y) in enumerate(gathered, start=start))
        yield from made_ahead(made) if device.type == "cpu" and augment is not None else made
        return

    items = [(k, *source.samples[k]) for k in idx[start * batch_size: n_batches * batch_size].tolist()]
    files = _Files(items, preprocess, None if augment is None else (seed, epoch, augment))
    # The loader's own generator: without one it draws its base seed from the global RNG, which a checkpoint
    # restores; the draw would then shift the dropout masks of a resumed run.
    loader = torch.utils.data.DataLoader(
        files, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
    )
    for i, (x, y, bad) in enumerate(loader, start=start):
        if x is None:
            continue
        yield finish(x, y, i, bad)


# ---------------------------------------------------------------------------------------------------------------
# Names of items, exclusion lists and saved splits (``audit`` writes them; ``train --exclude/--split`` reads them)


def fashion_mnist_name(index: int) -> str:
    """The name ``audit`` and ``train --exclude`` give image ``index`` of Fashion-MNIST's 60,000 training images."""
    return f"fashion-mnist/train/{index}"


def fashion_mnist_train_indices(split: dict) -> torch.Tensor:
    """The indices into the 60,000 training images of a Fashion-MNIST data set's train part (``load`` keeps both
    parts sorted)."""
    val = torch.tensor(split["val_indices_of_train"], dtype=torch.long)
    keep = torch.ones(60_000, dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten()


def item_names(dataset: Dataset) -> tuple[list[str], list[str]]:
    """The names of the train and validation items, in source order: file paths for folders, and
    ``fashion-mnist/train/<i>`` for Fashion-MNIST. Other in-memory sets have no names (a DataError)."""
    if isinstance(dataset.train, FileSource) and isinstance(dataset.val, FileSource):
        return [p for p, _ in dataset.train.samples], [p for p, _ in dataset.val.samples]
    if dataset.split.get("kind") == "fashion-mnist":
        train = fashion_mnist_train_indices(dataset.split).tolist()
        return [fashion_mnist_name(i) for i in train], [fashion_mnist_name(i) for i in dataset.split[
            "val_indices_of_train"]]
    raise DataError(f"{dataset.name}: its images have no file names; give its folder instead")


def read_file_list(path: str | Path) -> list[str]:
    """The files an exclusion list names: a CSV with a ``file`` column (``audit``'s issues.csv), or one path per
    line (blank lines and lines starting with # left out)."""
    import csv

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file (give audit's issues.csv, or a list of paths, one per line)")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if lines and "file" in next(csv.reader([lines[0]])):
        return [row["file"] for row in csv.DictReader(lines) if row.get("file")]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _key(name: str) -> str:
    return name if name.startswith("fashion-mnist/") else os.path.realpath(name)


def exclude(dataset: Dataset, listing: str | Path) -> tuple[Dataset, dict]:
    """``dataset`` without the files ``listing`` names (``read_file_list``), dropped from its train and validation
    sources before any cache is read. Returns it and {"train": dropped, "val": dropped, "unknown": names listed
    that are not in the data}; a DataError when the list names none of the data's files."""
    import dataclasses

    names = {_key(n) for n in read_file_list(listing)}
    if not names:
        raise DataError(f"{listing}: names no files")
    train_names, val_names = item_names(dataset)

    def keep(source: Source, its_names: list[str]) -> tuple[Source, int]:
        kept = torch.tensor([_key(n) not in names for n in its_names], dtype=torch.bool)
        if isinstance(source, FileSource):
            return FileSource([s for s, k in zip(source.samples, kept.tolist()) if k], source.root), int((~kept).sum())
        rows = torch.arange(len(source)) if source.rows is None else source.rows
        return TensorSource(source.images, source.labels[kept], rows[kept]), int((~kept).sum())

    train, n_train = keep(dataset.train, train_names)
    val, n_val = keep(dataset.val, val_names)
    if n_train + n_val == 0:
        raise DataError(f"{listing}: names none of the {len(train_names) + len(val_names)} files of {dataset.name} "
                        f"(e.g. {next(iter(names))})")
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{listing}: excluding its files leaves no {'training' if len(train) == 0 else 'validation'} "
                        f"images")
    found = {_key(n) for n in train_names + val_names}
    split = {**dataset.split, "excluded": {"list": str(Path(listing).resolve()), "train": n_train, "val": n_val}}
    return dataclasses.replace(dataset, train=train, val=val, split=split), {
        "train": n_train, "val": n_val, "unknown": len(names - found)}


def with_split(dataset: Dataset, split_file: str | Path) -> Dataset:
    """``dataset`` (a folder of class folders, split by ``--val-split``) re-split as ``split_file`` says: a
    split.json whose "val" lists the validation files relative to the folder (what ``audit --fix-split`` writes)."""
    import dataclasses
    import json

    path = Path(split_file).expanduser()
    try:
        saved = json.loads(path.read_text())
        val_names = [str(n) for n in saved["val"]]
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a split.json (a JSON object with a \"val\" list of files)") from None
    if dataset.split.get("kind") != "split" or not isinstance(dataset.train, FileSource):
        raise DataError(f"--split re-splits a folder of class folders; {dataset.name} has a fixed split (train/ and "
                        f"val/ folders, or a named data set): use --exclude with the files to drop instead")
    root = Path(dataset.split["root"])
    samples = sorted(dataset.train.samples + dataset.val.samples)
    val_set = {os.path.normpath(n) for n in val_names}
    known = {os.path.relpath(p, root) for p, _ in samples}
    unknown = sorted(val_set - known)
    if unknown:
        raise DataError(f"{path}: {len(unknown)} validation file(s) are not in {root}, e.g. {unknown[0]}")
    val = [s for s in samples if os.path.relpath(s[0], root) in val_set]
    train = [s for s in samples if os.path.relpath(s[0], root) not in val_set]
    if not val or not train:
        raise DataError(f"{path}: leaves no {'validation' if not val else 'training'} images")
    split = {**dataset.split, "val": sorted(val_set), "from": str(path.resolve())}
    return dataclasses.replace(dataset, train=FileSource(train, dataset.train.root),
                               val=FileSource(val, dataset.val.root), split=split)
