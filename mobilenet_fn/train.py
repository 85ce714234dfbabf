"""Training: the loss, the pure step, and the epoch loop.

    step(params, state, opt_state, batch, lr) -> (params, state, opt_state, metrics)

is built from ``torch.func.grad_and_value`` and an optimizer update, and compiled with ``torch.compile`` where that
is faster on the device at hand. ``Trainer.run()`` yields events (steps, epoch ends, checkpoints) and prints
nothing; the CLI turns them into progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import data as data_lib
from . import distributed
from .evaluate import evaluate
from .model import Config, apply, init
from .optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule


@dataclass
class TrainOptions:
    """Everything about a run except the architecture (``Config``) and the data."""

    data: str = "sample"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    weight_decay: float = 4e-5
    momentum: float = 0.9
    label_smoothing: float = 0.1
    augment: str = "crop-flip"  # or "none"
    compile: str = "auto"  # auto | on | cudagraphs | off
    channels_last: str = "auto"  # auto | on | off
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    seed: int = 0
    workers: int = 2
    val_split: float = 0.2
    device: str = "cpu"
    freeze_backbone: bool = False
    init_weights: str | None = None
    sync_bn: bool = False

    def __post_init__(self):
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            problems.append(f"--batch-size must be at least 2 (BatchNorm needs a batch), got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.augment not in ("crop-flip", "none"):
            problems.append(f"--augment must be crop-flip or none, got {self.augment!r}")
        if self.compile not in ("auto", "on", "cudagraphs", "off"):
            problems.append(f"--compile must be auto, on, cudagraphs or off, got {self.compile!r}")
        if self.compile == "cudagraphs" and not self.device.startswith("cuda"):
            problems.append("--compile cudagraphs needs a CUDA device (--device cuda)")
        if self.channels_last not in ("auto", "on", "off"):
            problems.append(f"--channels-last must be auto, on or off, got {self.channels_last!r}")
        if self.amp not in ("auto", "bf16", "off"):
            problems.append(f"--amp must be auto, bf16 or off, got {self.amp!r}")
        if self.workers < 0:
            problems.append(f"--workers must be >= 0, got {self.workers}")
        if problems:
            raise ValueError("; ".join(problems))


COMPILE_BACKEND = "inductor"  # tests swap in a counting backend

# ---------------------------------------------------------------------------------------------------------------
# Per-device choices. Fixed rules taken from bench/throughput.py, not measured at run time.


# On the CPU the compiled step ran 1.2-1.3x as fast as the eager one at 128 px and at alpha 0.5, and about even at
# 32 px and alpha 1 (bench/throughput.py), but takes a minute or two to compile on 2 cores: worth it from about
# this much training in a run, counted in 32 x 32 images (the step's cost grows with the pixels). A Fashion-MNIST
# run of 20 epochs is 1.1 M; `make train`, 60,000.
CPU_COMPILE_MIN_WORK = 500_000


def use_compile(opts: TrainOptions, device: torch.device, resolution: int = 224, images: int | None = None) -> bool:
    """--compile auto: always on CUDA; on the CPU when the run (``images`` trained on in all, None for a long run)
    is long enough to repay the compilation."""
    if opts.compile != "auto":
        return opts.compile != "off"
    if device.type != "cpu":
        return device.type == "cuda"
    return images is None or images * (resolution / 32) ** 2 >= CPU_COMPILE_MIN_WORK


# CUDA graphs replay a whole step as one launch. On an H100 (bench/throughput.py) they made the step 2.4x as fast
# at 32 px x 256 (19 ms a step without them, 8 ms with: launch-bound) and 0.96x at 224 px x 256 (22 ms,
# GPU-bound): they pay while a step holds few pixels.
CUDA_GRAPHS_MAX_PIXELS = 256 * 128 * 128  # batch x height x width: 128 px x 256, or 224 px x 83


def use_cuda_graphs(opts: TrainOptions, device: torch.device, resolution: int = 224, batch: int = 256) -> bool:
    """Whether the compiled step replays as CUDA graphs (torch.compile's "reduce-overhead"): --compile cudagraphs,
    or auto on CUDA for steps of up to ``CUDA_GRAPHS_MAX_PIXELS``."""
    if opts.compile != "auto":
        return opts.compile == "cudagraphs"
    return device.type == "cuda" and batch * resolution**2 <= CUDA_GRAPHS_MAX_PIXELS


def compile_step(step: Callable, cuda_graphs: bool = False) -> Callable:
    """``torch.compile(step, fullgraph=True)``. With CUDA graphs each call is marked as a new iteration and its
    outputs are copied out of the graphs' memory pool, which the next replay overwrites: the caller may keep them
    (a checkpoint, the best weights) and pass them back in. The copies are of parameter size, not activations."""
    compiled = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND,
                             mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return compiled

    def replay(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(torch.clone, compiled(*args))

    return replay


def use_channels_last(opts: TrainOptions, device: torch.device) -> bool:
    return opts.channels_last == "on" or (opts.channels_last == "auto" and device.type in ("cuda", "cpu"))


def autocast_dtype(opts: TrainOptions, device: torch.device) -> torch.dtype | None:
    if opts.amp == "bf16" or (opts.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def largest_batch(cfg: Config, opts: TrainOptions, device: torch.device, *, start: int = 32,
                  limit: int = 8192) -> tuple[int, dict[int, int]]:
    """The largest power-of-two batch whose training step fits in the GPU's memory, and the peak memory (bytes)
    of each batch size tried. Probes with the eager step (which needs at least the compiled step's memory)."""
    params, state = init(cfg)
    params, state = to_device(params, device), to_device(state, device)
    optimizer = make_optimizer(opts.optimizer, weight_decay=opts.weight_decay, momentum=opts.momentum)
    step = make_step(cfg, optimizer, amp_dtype=autocast_dtype(opts, device), for_compile=False)
    mem = torch.channels_last if use_channels_last(opts, device) else torch.contiguous_format
    peaks: dict[int, int] = {}
    best, batch = 0, start
    while batch <= limit:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randn(batch, 3, cfg.resolution, cfg.resolution, device=device).contiguous(memory_format=mem)
            y = torch.randint(0, cfg.num_classes, (batch,), device=device)
            step(params, state, optimizer.init(params), (x, y), torch.tensor(0.0, device=device))
            torch.cuda.synchronize(device)
            peaks[batch] = torch.cuda.max_memory_allocated(device)
            del x, y
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
    torch.cuda.empty_cache()
    if not best:
        raise ValueError(f"a batch of {start} does not fit in the GPU's memory; pass a smaller --batch-size")
    return best, peaks


# ---------------------------------------------------------------------------------------------------------------
# The step


def trainable(params: dict, head_only: bool) -> dict:
    """The part of ``params`` that the optimizer updates: all of it, or only the classifier."""
    return {"fc": params["fc"]} if head_only else params


def autograd_grad_and_value(fn: Callable, has_aux: bool = True) -> Callable:
    """``torch.func.grad_and_value(fn, has_aux=True)``'s contract, computed with ``torch.autograd.grad`` on
    detached copies of the first argument's leaves: the same numbers, and nothing the caller holds is touched.

    For the eager step: functorch wraps every tensor of every op, which made an eager CPU step about 20 %
    slower (25 % with ReLU6; bench/throughput.py). A compiled step traces ``torch.func`` into one graph instead.
    """
    assert has_aux

    def grad_and_value(primal, *args):
        leaves, spec = tree_flatten(primal)
        leaves = [leaf.detach().requires_grad_() for leaf in leaves]
        with torch.enable_grad():
            loss, aux = fn(tree_unflatten(leaves, spec), *args)
            grads = torch.autograd.grad(loss, leaves)
        return tree_unflatten(list(grads), spec), (loss.detach(), tree_map(torch.Tensor.detach, aux))

    return grad_and_value


def make_step(
    cfg: Config,
    optimizer,
    *,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    reduce_grads: Callable | None = None,
    head_only: bool = False,
    for_compile: bool = True,
    bn_reduce: Callable | None = None,
):
    """The pure training step for ``cfg`` and ``optimizer``.

    ``reduce_grads`` (distributed) averages the gradient tree across processes. ``head_only`` trains only the
    classifier on a frozen backbone, which then runs in eval mode (its running statistics are kept too).
    ``for_compile=False`` takes gradients with ``autograd_grad_and_value``, faster when the step runs eagerly.
    ``bn_reduce`` (a sum across processes) synchronises BatchNorm; it needs ``for_compile=False``, since its
    autograd function holds collectives that torch.func does not trace.
    """
    grad_and_value = torch.func.grad_and_value if for_compile else autograd_grad_and_value

    def loss_fn(learned, params, state, x, y):
        ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            logits, new_state = apply(cfg, {**params, **learned}, state, x, train=not head_only, bn_reduce=bn_reduce)
        if amp_dtype:
            logits = logits.float()  # the loss in float32
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, (new_state, logits)

    def step(params, state, opt_state, batch, lr):
        x, y = batch
        learned = trainable(params, head_only)
        grads, (loss, (new_state, logits)) = grad_and_value(loss_fn, has_aux=True)(learned, params, state, x, y)
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        learned, opt_state = optimizer.update(grads, opt_state, learned, lr)
        correct = (logits.argmax(1) == y).sum()
        return {**params, **learned}, new_state, opt_state, {"loss": loss.detach(), "correct": correct}

    return step


def to_device(tree, device, channels_last: bool = False):
    """Moves a tree of tensors; 4-d tensors (full conv weights) go channels-last when asked."""

    def move(t):
        t = t.to(device)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    return tree_map(move, tree)


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class StepEvent:
    epoch: int
    batch: int  # index within the epoch, 1-based
    batches: int
    loss: float
    top1: float
    img_per_s: float
    lr: float
    data_wait: float  # fraction of the epoch's time so far spent waiting for batches


@dataclass
class EpochEvent:
    metrics: dict
    best: bool


@dataclass
class CheckpointEvent:
    path: Path


@dataclass
class StartEvent:
    epoch: int
    epochs: int
    batches: int
    device: str
    compiled: bool
    channels_last: bool
    amp: str | None
    skipped_files: int = 0
    cuda_graphs: bool = False


@dataclass
class Trainer:
    cfg: Config
    opts: TrainOptions
    dataset: data_lib.Dataset
    out: Path
    device: torch.device
    params: dict = field(default=None)
    state: dict = field(default=None)
    opt_state: dict = field(default=None)
    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # completed batches of the current epoch
    global_step: int = 0
    best: dict | None = None
    dist: distributed.Context = field(default_factory=distributed.Context)

    def __post_init__(self):
        self.rank, self.world = self.dist.rank, self.dist.world
        self.reduce_grads = distributed.mean_across_ranks if self.dist.active else None
        # Synchronised BatchNorm's autograd function runs collectives that torch.func does not trace: eager step.
        self.bn_reduce = distributed.reduce_sum if self.dist.active and self.opts.sync_bn else None
        self.channels_last = use_channels_last(self.opts, self.device)
        self.amp = autocast_dtype(self.opts, self.device)
        self.best_weights = None  # (params, state) on the CPU, of the best epoch
        self.optimizer = make_optimizer(self.opts.optimizer, weight_decay=self.opts.weight_decay,
                                        momentum=self.opts.momentum)
        n_train = len(self.dataset.train) // self.world
        self.batches = n_train // self.opts.batch_size
        if self.batches < 1:
            raise ValueError(f"--batch-size {self.opts.batch_size} is larger than the training set "
                             f"({len(self.dataset.train)} images); use a smaller one")
        total = self.batches * self.opts.epochs
        self.compiled = (use_compile(self.opts, self.device, self.cfg.resolution, total * self.opts.batch_size)
                         and self.bn_reduce is None)
        # Collectives inside CUDA graphs need NCCL set up for it: the distributed step replays no graphs.
        self.cuda_graphs = (self.compiled and not self.dist.active
                            and use_cuda_graphs(self.opts, self.device, self.cfg.resolution, self.opts.batch_size))
        self.schedule = make_schedule(self.opts.schedule, self.opts.lr, total,
                                      warmup_steps=round(self.opts.warmup_epochs * self.batches))
        self.skipped: set[str] = set(self.dataset.skipped)

    # -- state ---------------------------------------------------------------------------------------------
    def start_fresh(self, params=None, state=None):
        if params is None:
            params, state = init(self.cfg, torch.Generator().manual_seed(self.opts.seed))
        self.params = to_device(params, self.device)
        self.state = to_device(state, self.device)
        self.opt_state = self.optimizer.init(trainable(self.params, self.opts.freeze_backbone))

    def checkpoint(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {  # save_checkpoint adds the format
            "config": self.cfg.to_dict(),
            "params": to_device(self.params, "cpu"),
            "state": to_device(self.state, "cpu"),
            "opt_state": to_device(self.opt_state, "cpu"),
            "classes": list(self.dataset.classes),
            "preprocess": self.dataset.preprocess,
            "data": self.dataset.split,
            "metrics": dict(self.best or {}),
            "epoch": self.epoch,
            "step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng,
            "run": asdict(self.opts),
            "world": self.world,
        }

    def restore(self, ckpt: dict) -> None:
        self.params = to_device(ckpt["params"], self.device)
        self.state = to_device(ckpt["state"], self.device)
        self.opt_state = to_device(ckpt["opt_state"], self.device)
        self.epoch = ckpt["epoch"]
        # Positions count this run's batches: a run saved with N processes may resume with M.
        self.batch_in_epoch = ckpt["batch_in_epoch"] * ckpt.get("world", 1) // self.world
        self.global_step = self.epoch * self.batches + self.batch_in_epoch
        self.best = ckpt["metrics"] or None
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)

    def save(self, name: str, ckpt: dict | None = None) -> Path:
        """Writes ``ckpt`` (default: the current ``checkpoint()``) to ``out/name``."""
        from .weights import save_checkpoint

        path = self.out / name
        save_checkpoint(path, self.checkpoint() if ckpt is None else ckpt)
        return path

    # -- loop ----------------------------------------------------------------------------------------------
    def build_step(self):
        step = make_step(self.cfg, self.optimizer, label_smoothing=self.opts.label_smoothing, amp_dtype=self.amp,
                         reduce_grads=self.reduce_grads, head_only=self.opts.freeze_backbone,
                         for_compile=self.compiled, bn_reduce=self.bn_reduce)
        return compile_step(step, self.cuda_graphs) if self.compiled else step

    def run(self) -> Iterator:
        """Trains from ``self.epoch``/``self.batch_in_epoch`` to ``opts.epochs``, yielding events."""
        step = self.build_step()
        opts = self.opts
        yield StartEvent(self.epoch, opts.epochs, self.batches, str(self.device), self.compiled,
                         self.channels_last, str(self.amp).replace("torch.", "") if self.amp else None,
                         len(self.skipped), self.cuda_graphs)
        while self.epoch < opts.epochs:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            seen = 0
            last_report = t0
            batches = data_lib.batches(
                self.dataset.train, self.dataset.preprocess, batch_size=opts.batch_size, train=True,
                augment=opts.augment != "none", device=self.device, seed=opts.seed, epoch=self.epoch,
                start=self.batch_in_epoch, workers=opts.workers, shard=(self.rank, self.world),
                channels_last=self.channels_last,
            )
            waited = 0.0  # seconds spent waiting for the next batch
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                waited += time.perf_counter() - t_wait
                if batch is None:
                    break
                self.skipped.update(batch.skipped)
                if len(batch.y) != opts.batch_size:
                    continue  # an unreadable file shortened this batch: keep one shape for the compiled step
                lr = self.schedule(self.global_step)
                out = step(self.params, self.state, self.opt_state, (batch.x, batch.y),
                           torch.tensor(lr, device=self.device))
                self.params, self.state, self.opt_state, metrics = out
                self.batch_in_epoch += 1
                self.global_step += 1
                loss_sum += metrics["loss"]
                correct += metrics["correct"]
                seen += len(batch.y)
                now = time.perf_counter()
                if now - last_report > 0.5 or self.batch_in_epoch == self.batches:
                    last_report = now
                    mean_loss = loss_sum.item() / max(1, seen // opts.batch_size)
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLoss(self.epoch + 1, self.batch_in_epoch)
                    yield StepEvent(self.epoch + 1, self.batch_in_epoch, self.batches, mean_loss,
                                    correct.item() / max(1, seen), seen / (now - t0), lr, waited / (now - t0))
            train_seconds = time.perf_counter() - t0
            if self.dist.active:
                totals = distributed.reduce_sum(torch.stack([loss_sum, correct.double(), torch.tensor(
                    float(seen), device=self.device, dtype=torch.float64)]).double())
                loss_sum, correct, seen = totals[0] / self.world, totals[1], int(totals[2].item())
                distributed.check_in_sync(self.params, self.dist)
            n_steps = max(1, seen // (opts.batch_size * self.world))
            train_loss = loss_sum.item() / n_steps
            if not math.isfinite(train_loss):
                raise NonFiniteLoss(self.epoch + 1, self.batch_in_epoch)
            self.epoch += 1
            self.batch_in_epoch = 0
            val = self.validate(self.dataset.val)
            self.skipped.update(val["skipped"])
            metrics = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                "train_top1": correct.item() / max(1, seen),
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
                "lr": self.schedule(self.global_step - 1),
                "img_per_s": seen / max(train_seconds, 1e-9),
                "seconds": time.perf_counter() - t0,
                "data_wait": waited / max(train_seconds, 1e-9),
                "skipped_files": len(self.skipped),
                "step": self.global_step,
            }
            improved = self.best is None or (val["top1"], -val["loss"]) > (self.best["val_top1"], -self.best["val_loss"])
            if improved:
                self.best = dict(metrics)
                self.best_weights = (to_device(self.params, "cpu"), to_device(self.state, "cpu"))
            if self.rank == 0:
                ckpt = self.checkpoint()  # one copy to the CPU for both files
                if improved:
                    yield CheckpointEvent(self.save("best.ckpt", ckpt))
                    self.write_weights()
                yield CheckpointEvent(self.save("last.ckpt", ckpt))
            if self.epoch == opts.epochs and self.dataset.test is not None:
                metrics.update(self.test_best())
            if self.rank == 0:
                self.append_metrics(metrics)
            yield EpochEvent(metrics, improved)

    def validate(self, source, params=None, state=None) -> dict:
        """Metrics on ``source``, each process evaluating its shard and the counts summed."""
        return evaluate(self.cfg, self.params if params is None else params,
                        self.state if state is None else state, source, self.dataset.preprocess,
                        batch_size=max(self.opts.batch_size, 128), device=self.device,
                        channels_last=self.channels_last, amp_dtype=self.amp, workers=self.opts.workers,
                        shard=(self.rank, self.world), reduce=distributed.reduce_sum if self.dist.active else None)

    def test_best(self) -> dict:
        """Test-set metrics of the best epoch's weights (the test set never picks the epoch)."""
        if self.best_weights is None:  # resumed after the best epoch: its weights are in best.ckpt
            from .weights import load_checkpoint

            best = load_checkpoint(self.out / "best.ckpt")
            self.best_weights = (best["params"], best["state"])
        params, state = (to_device(t, self.device) for t in self.best_weights)
        result = self.validate(self.dataset.test, params, state)
        return {"test_top1": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"],
                "test_of_epoch": self.best["epoch"]}

    def write_weights(self) -> None:
        from .weights import Weights, save_weights

        params, state = self.best_weights
        save_weights(self.out / "weights.pkl", Weights(
            self.cfg, params, state, list(self.dataset.classes), self.dataset.preprocess, self.dataset.split,
            dict(self.best or {})))

    def append_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, batch: int):
        super().__init__(f"the loss became NaN or infinite (epoch {epoch}, batch {batch}); lower --lr or check "
                         f"the data. The last good checkpoint is kept.")


# ---------------------------------------------------------------------------------------------------------------
# Run folders


def default_run_dir(data: str, cfg: Config, root: Path = Path("runs")) -> Path:
    """runs/<data>-a<alpha>-r<resolution>, with -2, -3, ... when taken."""
    name = Path(data).name if data not in data_lib.DEFAULT_RESOLUTION else data
    base = root / f"{name}-a{cfg.alpha:g}-r{cfg.resolution}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
