"""Which items go where: stratified splits and folds, the names of items, and excluding or re-splitting files.

``audit`` writes the names of suspect files (issues.csv) and a corrected split (split.json); ``train --exclude``
and ``train --split`` read them back through ``exclude`` and ``with_split``, before any cache is read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from .sources import DataError, Dataset, FileSource, Source

FASHION_MNIST_TRAIN_IMAGES = 60_000


# ---------------------------------------------------------------------------------------------------------------
# Splits and folds, stratified by class


def _shuffled_by_class(labels: torch.Tensor, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(class, the indices of its items in a seeded random order) for each class of ``labels``, in class order:
    one generator draws every class's order, so the same labels and seed give the same orders."""
    generator = torch.Generator().manual_seed(seed)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        yield c, idx[torch.randperm(len(idx), generator=generator)]


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): each class contributes round(n_class * val_fraction) validation items, at least one."""
    train, val = [], []
    for c, idx in _shuffled_by_class(labels, seed):
        n_val = max(1, round(len(idx) * val_fraction))
        if n_val >= len(idx):
            raise DataError(f"class {c} has {len(idx)} image(s): too few to hold out a validation split")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """(N,) the fold of each item: each class's items shuffled (seeded) and dealt round-robin into ``folds``."""
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    fold = torch.empty(len(labels), dtype=torch.long)
    start = 0
    for _, idx in _shuffled_by_class(labels, seed):
        fold[idx] = (torch.arange(len(idx)) + start) % folds  # the class's remainder lands on different folds
        start += len(idx)
    return fold


# ---------------------------------------------------------------------------------------------------------------
# Names of items, exclusion lists and saved splits


def fashion_mnist_name(index: int) -> str:
    """The name ``audit`` and ``train --exclude`` give image ``index`` of Fashion-MNIST's 60,000 training images."""
    return f"fashion-mnist/train/{index}"


def fashion_mnist_train_indices(split: dict) -> torch.Tensor:
    """The indices into the 60,000 training images of a Fashion-MNIST data set's train part (``load`` keeps both
    parts sorted)."""
    val = torch.tensor(split["val_indices_of_train"], dtype=torch.long)
    keep = torch.ones(FASHION_MNIST_TRAIN_IMAGES, dtype=torch.bool)
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
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file (give audit's issues.csv, or a list of paths, one per line)")
    lines = path.read_text(errors="replace").splitlines()
    if lines and "file" in next(csv.reader([lines[0]])):
        return [row["file"] for row in csv.DictReader(lines) if row.get("file")]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _key(name: str) -> str:
    return name if name.startswith("fashion-mnist/") else os.path.realpath(name)


def exclude(dataset: Dataset, listing: str | Path) -> tuple[Dataset, dict]:
    """``dataset`` without the files ``listing`` names (``read_file_list``), dropped from its train and validation
    sources before any cache is read. Returns it and {"train": dropped, "val": dropped, "unknown": names listed
    that are not in the data}; a DataError when the list names none of the data's files."""
    listed = {_key(n) for n in read_file_list(listing)}
    if not listed:
        raise DataError(f"{listing}: names no files")
    train_names, val_names = item_names(dataset)

    def without_listed(source: Source, its_names: list[str]) -> tuple[Source, int]:
        dropped = torch.tensor([_key(n) in listed for n in its_names], dtype=torch.bool)
        return source.subset((~dropped).nonzero().flatten()), int(dropped.sum())

    train, n_train = without_listed(dataset.train, train_names)
    val, n_val = without_listed(dataset.val, val_names)
    if n_train + n_val == 0:
        raise DataError(f"{listing}: names none of the {len(train_names) + len(val_names)} files of {dataset.name} "
                        f"(e.g. {next(iter(listed))})")
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{listing}: excluding its files leaves no {'training' if len(train) == 0 else 'validation'} "
                        f"images")
    found = {_key(n) for n in train_names + val_names}
    split = {**dataset.split, "excluded": {"list": str(Path(listing).resolve()), "train": n_train, "val": n_val}}
    return dataclasses.replace(dataset, train=train, val=val, split=split), {
        "train": n_train, "val": n_val, "unknown": len(listed - found)}


def with_split(dataset: Dataset, split_file: str | Path) -> Dataset:
    """``dataset`` (a folder of class folders, split by ``--val-split``) re-split as ``split_file`` says: a
    split.json whose "val" lists the validation files relative to the folder (what ``audit --fix-split`` writes)."""
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
