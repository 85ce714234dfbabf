"""Training checkpoints (``last.ckpt``, ``best.ckpt``): built, written, read and checked.

A checkpoint holds what a weights file holds (``weights.py``, whose field checks it shares) and what resuming
needs::

    {"format": "mobilenet-fn-checkpoint/2", "config", "params", "state", "classes", "preprocess", "data", "metrics",
     "opt_state": the optimizer's tree (with the weight EMA's under "ema"), "epoch", "step", "batch_in_epoch",
     "epoch_progress": EpochProgress's fields, "rng": {"torch", and "cuda" from a CUDA run},
     "run": TrainOptions' fields, "world": the number of processes}

Format 1 (written before ``epoch_progress`` and ``world``) is not read: such a run cannot be resumed, and its
``weights.pkl`` holds its best epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .model import Config
from .optim import make_optimizer
from .options import TrainOptions
from .step import init_opt_state
from .weights import (
    CHECKPOINT_FAMILY, FORMAT as WEIGHTS_FORMAT, Weights, WeightsError, atomic_save, content_problem, expected_trees,
    fields_problem, format_problem, keys_problem, overlaps, read_torch_file, shown, tree_problem, value_fits,
    weights_from_fields,
)

FORMAT = CHECKPOINT_FAMILY + "2"
KEYS = ("format", "config", "params", "state", "classes", "preprocess", "data", "metrics", "opt_state", "epoch",
        "step", "batch_in_epoch", "epoch_progress", "rng", "run", "world")


@dataclass
class EpochProgress:
    """How far the epoch under way has come, a checkpoint's ``epoch_progress``: its training sums over all
    processes so far, and whether they are the totals of the last epoch trained, whose end (validation, files,
    metrics line) is still owed."""

    loss: float = 0.0  # the steps' losses, each the mean over the processes
    correct: int = 0  # right top-1 answers
    seen: int = 0  # images
    trained: bool = False  # the totals of the checkpoint's epoch ``epoch``, not yet recorded


def build(weights: Weights, *, opt_state: dict, epoch: int, step: int, batch_in_epoch: int,
          progress: EpochProgress, opts: TrainOptions, world: int, device: torch.device) -> dict:
    """The checkpoint of a run at this point (``save_checkpoint`` adds the format): ``weights`` are the current
    trees and description, ``weights.metrics`` the best epoch's; every tree on the CPU."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"config": weights.config.to_dict(), "params": weights.params, "state": weights.state,
            "classes": list(weights.classes), "preprocess": weights.preprocess, "data": weights.data,
            "metrics": dict(weights.metrics or {}), "opt_state": opt_state, "epoch": epoch, "step": step,
            "batch_in_epoch": batch_in_epoch, "epoch_progress": asdict(progress), "rng": rng, "run": asdict(opts),
            "world": world}


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Writes a training checkpoint atomically (``format`` is set here)."""
    atomic_save({**ckpt, "format": FORMAT}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Reads a training checkpoint and checks all of it: format, keys, config, trees, position, options."""
    return checkpoint_from_dict(read_torch_file(path), path)


def checkpoint_from_dict(obj: dict, path: str | Path) -> dict:
    """``obj`` itself once checked as a training checkpoint read from ``path`` (named in errors)."""
    fmt = obj.get("format")
    if fmt == WEIGHTS_FORMAT:
        raise WeightsError(f"{path}: is a weights file, not a training checkpoint")
    if fmt == CHECKPOINT_FAMILY + "1":
        raise WeightsError(f"{path}: a checkpoint of an older mobilenet-fn (format 1), which cannot be resumed; "
                           f"the run's weights.pkl holds its best epoch")
    if fmt != FORMAT:
        raise WeightsError(f"{path}: {format_problem(fmt, FORMAT)}")
    problem = keys_problem(obj, KEYS) or content_problem(obj) or _training_problem(obj)
    if problem:
        raise WeightsError(f"{path}: {problem}")
    return obj


def weights_from_checkpoint(ckpt: dict) -> Weights:
    """The inference part of a checkpoint (the optimizer state, position and RNG states dropped): the weight EMA's
    params and state where the run kept one, as its weights.pkl has them."""
    kept = ckpt["opt_state"].get("ema")
    return weights_from_fields(ckpt if kept is None else {**ckpt, "params": kept["params"], "state": kept["state"]})


def run_options(ckpt: dict, device: str) -> TrainOptions:
    """The options the checkpoint's run resumes with on ``device`` (CUDA graphs fall back to auto off CUDA)."""
    run = {**ckpt["run"], "device": device}
    if run["compile"] == "cudagraphs" and not device.startswith("cuda"):
        run["compile"] = "auto"
    return TrainOptions(**run)


def _training_problem(obj: dict) -> str | None:
    """What is wrong with what a checkpoint adds to a weights file's content, or None. Called after
    ``content_problem``."""
    run = obj["run"]
    problem = fields_problem("run", run, TrainOptions)
    if problem:
        return problem
    missing = [f.name for f in dataclasses.fields(TrainOptions) if f.name not in run]
    if missing:
        return f"run lacks {', '.join(missing)}"
    try:
        run = run_options(obj, "cpu")  # as `train --resume` takes them, on a device of its own
    except (TypeError, ValueError) as e:
        return f"run: {e}"
    for key, least in (("epoch", 0), ("step", 0), ("batch_in_epoch", 0), ("world", 1)):
        if not value_fits(obj[key], int) or obj[key] < least:
            return f"{key} must be an integer of at least {least}, not {shown(obj[key])}"
    if obj["epoch"] > run.epochs:
        return f"epoch {obj['epoch']} is beyond the run's {run.epochs} epochs"
    if obj["batch_in_epoch"] > obj["step"]:
        return f"batch_in_epoch {obj['batch_in_epoch']} is beyond step {obj['step']}"
    problem = _progress_problem(obj["epoch_progress"]) or _rng_problem(obj["rng"])
    if problem:
        return problem
    optimizer = make_optimizer(run.optimizer, weight_decay=run.weight_decay, momentum=run.momentum)
    with torch.device("meta"):
        expected = init_opt_state(optimizer, *expected_trees(Config.from_dict(obj["config"])),
                                  head_only=run.freeze_backbone, ema_decay=run.ema)
    problem = tree_problem("opt_state", obj["opt_state"], expected)
    if problem:
        return (f"{problem} (optimizer {run.optimizer}" + (", backbone frozen" if run.freeze_backbone else "")
                + (", weight EMA" if run.ema else "") + ")")
    return None


def _progress_problem(progress) -> str | None:
    problem = fields_problem("epoch_progress", progress, EpochProgress)
    if problem:
        return problem
    missing = [f.name for f in dataclasses.fields(EpochProgress) if f.name not in progress]
    if missing:  # written whole, so a part is damage
        return "epoch_progress lacks " + ", ".join(missing)
    if not 0 <= progress["correct"] <= progress["seen"]:
        return f"epoch_progress: {progress['correct']} right answers of {progress['seen']} images"
    return None


def _rng_problem(rng) -> str | None:
    """{"torch": torch.get_rng_state()} and, from a CUDA run, "cuda": torch.cuda.get_rng_state(): uint8 vectors
    that ``torch.set_rng_state`` takes."""
    if not isinstance(rng, dict) or "torch" not in rng:
        return "rng must be a dict with the torch generator's state"
    unknown = [k for k in rng if k not in ("torch", "cuda")]
    if unknown:
        return f"unknown rng field {shown(unknown[0])}"
    for key, value in rng.items():
        size = torch.get_rng_state().numel() if key == "torch" else None
        if (not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1
                or value.layout != torch.strided or value.device.type != "cpu" or overlaps(value)
                or (size is not None and value.numel() != size) or not 0 < value.numel() <= 1024 * 1024):
            return (f"rng.{key} is not a generator state (a CPU uint8 vector"
                    + (f" of {size} bytes)" if size is not None else ")"))
    return None
