"""The run folder: ``train`` creates one, or reopens it to resume, and this object owns every file in it.

    runs/<data>-a<alpha>-r<resolution>/
        config.json     the model, the training options, the classes and the preprocessing
        split.json      where the data came from and which part of it is validation
        metrics.jsonl   one JSON object per epoch
        last.ckpt       the latest checkpoint: every epoch, and where Ctrl-C or SIGTERM stopped a run
        best.ckpt       the checkpoint of the best validation epoch
        weights.pkl     that epoch's inference weights
        curves.png      loss and accuracy per epoch

Every file appears whole or not at all (``files.atomic_write``), except metrics.jsonl, which grows by a flushed
line per epoch. An existing folder is never created over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import load_checkpoint, save_checkpoint
from .data import DEFAULT_RESOLUTION
from .files import free_name, new_folder, write_json
from .model import Config
from .weights import Weights, save_weights


def default_run_dir(name_or_folder: str, cfg: Config, root: Path = Path("runs")) -> Path:
    """runs/<data>-a<alpha>-r<resolution> for ``--data name_or_folder``, with -2, -3, ... when taken."""
    name = name_or_folder if name_or_folder in DEFAULT_RESOLUTION else Path(name_or_folder).name
    return free_name(root / f"{name}-a{cfg.alpha:g}-r{cfg.resolution}")


def taken(path: Path) -> str:
    """What to say when a new run's folder ``path`` already exists."""
    return f"{path} already exists; continue it with --resume {path}, or pick another --out"


class RunDir:
    """One run's folder. ``create`` a new one or ``open`` an existing one; then save each epoch's files."""

    def __init__(self, path: Path, metrics: list[dict]):
        self.path = Path(path)
        self.metrics = metrics  # every epoch recorded so far, as in metrics.jsonl

    @classmethod
    def create(cls, path: Path, *, config: dict, split: dict) -> "RunDir":
        """Makes the folder (which must not exist) and writes config.json and split.json."""
        path = new_folder(path, taken(path))
        write_json(path / "config.json", config)
        write_json(path / "split.json", split)
        return cls(path, [])

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run to continue: it must hold last.ckpt."""
        path = Path(path)
        if not (path / "last.ckpt").is_file():
            raise FileNotFoundError(f"{path}: no last.ckpt to resume from")
        lines = (path / "metrics.jsonl").read_text().splitlines() if (path / "metrics.jsonl").exists() else []
        return cls(path, [json.loads(line) for line in lines if line.strip()])

    @property
    def weights_path(self) -> Path:
        return self.path / "weights.pkl"

    def load_last(self) -> dict:
        return load_checkpoint(self.path / "last.ckpt")

    def load_best(self) -> dict | None:
        """The best epoch's checkpoint, or None before the first epoch ended."""
        return load_checkpoint(self.path / "best.ckpt") if (self.path / "best.ckpt").exists() else None

    def save_last(self, checkpoint: dict) -> Path:
        """last.ckpt: at the end of each epoch, and where a run was stopped."""
        save_checkpoint(self.path / "last.ckpt", checkpoint)
        return self.path / "last.ckpt"

    def save_epoch(self, checkpoint: dict, weights: Weights | None) -> None:
        """A validated epoch: best.ckpt and weights.pkl when ``weights`` is given (the best epoch so far), then
        last.ckpt."""
        if weights is not None:
            save_checkpoint(self.path / "best.ckpt", checkpoint)
            save_weights(self.weights_path, weights)
        self.save_last(checkpoint)

    def append_metrics(self, metrics: dict) -> None:
        """A line of metrics.jsonl, unless its epoch has one: a run stopped right after writing it redoes the end of
        that epoch on resume."""
        if self.metrics and self.metrics[-1]["epoch"] >= metrics["epoch"]:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.metrics.append(metrics)

    def plot_curves(self) -> Path:
        from .plots import plot_curves

        plot_curves(self.metrics, self.path / "curves.png")
        return self.path / "curves.png"
