"""What a data set is: its images as a ``Source`` (in memory, or files on disk), and a ``Dataset`` of sources.

A ``TensorSource`` holds uint8 images in memory, or memory-mapped from a folder's decoded cache (``cache.py``), and
is augmented per batch on the device; a ``FileSource`` lists image files, streamed through a DataLoader with
workers (``--cache off``). Either gives any part of itself with ``subset(items)``. Unreadable files are skipped and
counted as ``Skipped``; a mistake in the data the user gave is a ``DataError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def subset(self, items: torch.Tensor) -> TensorSource:
        """The items at the indices ``items``, in that order; the images are shared, not copied."""
        rows = torch.arange(len(self)) if self.rows is None else self.rows
        return TensorSource(self.images, self.labels[items], rows[items])


@dataclass
class FileSource:
    samples: list[tuple[str, int]]  # (path, label)
    root: str | None = None  # the folder of class folders the files come from (what a decoded cache covers)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def subset(self, items: torch.Tensor) -> FileSource:
        """The items at the indices ``items``, in that order, from the same folder."""
        return FileSource([self.samples[i] for i in items.tolist()], self.root)


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
