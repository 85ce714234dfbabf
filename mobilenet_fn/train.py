"""Training: the epoch loop.

``Trainer.run()`` trains with the step that ``step.build_step`` makes, validates after each epoch, keeps the best
epoch's weights in memory and yields events: a start, steps, and epoch ends that carry the checkpoint and (when
the epoch is the best so far) the weights to keep, then the epoch's metrics. It writes no file and prints nothing:
the run folder (``rundir.RunDir``) writes what the events carry, and the CLI turns them into progress. A checkpoint
taken anywhere (``Trainer.checkpoint()``: on Ctrl-C or SIGTERM) resumes to the files of a run straight through: it
holds the epoch's training sums so far, and an epoch counts as done only once its metrics line is handed over.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import batches as batch_lib
from . import distributed
from .augment import Augment
from .checkpoint import EpochProgress, build as build_checkpoint
from .evaluate import evaluate
from .model import Config
from .optim import make_optimizer, make_schedule
from .options import TrainOptions
from .sources import Dataset
from .step import averaged, build_step, device_policy, inference_policy, initial_state, to_device
from .weights import Weights


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
class CheckpointEvent:
    """What to keep of an epoch just validated, handed over on rank 0 before its test pass and metrics line."""

    checkpoint: dict  # last.ckpt, and best.ckpt when ``weights`` is given: the run as it is once the epoch is recorded
    weights: Weights | None  # the inference weights of this epoch, when it is the best so far


@dataclass
class EpochEvent:
    """An epoch's metrics line; the run moves on to the next epoch once its consumer has handled it."""

    metrics: dict  # with the test set's metrics of the best epoch after the last epoch, where there is a test set
    best: bool  # the best validation epoch so far


@dataclass
class StartEvent:
    epoch: int
    epochs: int
    batches: int
    device: str
    policy: str  # how the step runs, e.g. "compiled, CUDA graphs, channels-last, bfloat16"
    compiled: bool
    skipped_files: int = 0


@dataclass
class Trainer:
    """The training loop of one run of ``cfg`` on ``dataset``. Start it with ``start_fresh()`` or ``restore()``,
    then iterate ``run()``."""

    cfg: Config
    opts: TrainOptions
    dataset: Dataset
    device: torch.device
    dist: distributed.Context = field(default_factory=distributed.Context)
    params: dict = field(default=None)
    state: dict = field(default=None)
    opt_state: dict = field(default=None)
    epoch: int = 0  # trained epochs (the last one's end is owed while ``progress.trained``)
    batch_in_epoch: int = 0  # completed batches of the current epoch
    global_step: int = 0
    best: dict | None = None  # the metrics of the best epoch
    best_weights: tuple[dict, dict] | None = None  # its (params, state), on the CPU
    # The epoch's training sums carried in from a checkpoint, or, once its batches are trained, its totals.
    progress: EpochProgress = field(default_factory=EpochProgress)

    def __post_init__(self):
        self.rank, self.world = self.dist.rank, self.dist.world
        self.reduce_grads = distributed.mean_across_ranks if self.dist.active else None
        # Synchronised BatchNorm's autograd function runs collectives that torch.func does not trace: eager step.
        self.bn_reduce = distributed.reduce_sum if self.dist.active and self.opts.sync_bn else None
        self.optimizer = make_optimizer(self.opts.optimizer, weight_decay=self.opts.weight_decay,
                                        momentum=self.opts.momentum)
        n_train = len(self.dataset.train) // self.world
        self.batches = n_train // self.opts.batch_size
        if self.batches < 1:
            raise ValueError(f"--batch-size {self.opts.batch_size} is larger than the training set "
                             f"({len(self.dataset.train)} images); use a smaller one")
        total = self.batches * self.opts.epochs
        self.policy = device_policy(
            self.device, compile=self.opts.compile, channels_last=self.opts.channels_last, amp=self.opts.amp,
            resolution=self.cfg.resolution, batch=self.opts.batch_size, images=total * self.opts.batch_size,
            distributed=self.dist.active, eager_only=self.bn_reduce is not None)
        # Validation runs as eval does on the CPU (float32: bf16 inference is no faster there,
        # bench/bf16_inference.py), and in the training step's bf16 on CUDA.
        self.eval_policy = self.policy if self.device.type == "cuda" else inference_policy(self.device)
        self.schedule = make_schedule(self.opts.schedule, self.opts.lr, total,
                                      warmup_steps=round(self.opts.warmup_epochs * self.batches))
        self.skipped: set[str] = set(self.dataset.skipped)

    # -- state ---------------------------------------------------------------------------------------------
    def start_fresh(self, start: tuple[dict, dict] | None = None) -> None:
        """Parameters drawn from the seed, or ``start`` = (params, state) to fine-tune from. Torch's global RNG
        (dropout), which checkpoints carry on, is seeded too: a run is a function of its options alone."""
        torch.manual_seed(self.opts.seed)
        self.params, self.state, self.opt_state = initial_state(
            self.cfg, self.optimizer, self.device, seed=self.opts.seed, start=start,
            head_only=self.opts.freeze_backbone, ema_decay=self.opts.ema)
        self.loss_sum, self.correct, self.seen = self._running_sums(self.progress)

    def checkpoint(self, cpu_trees: tuple[dict, dict] | None = None) -> dict:
        """Everything needed to resume from where the run is now, on the CPU. ``cpu_trees``: (params, state)
        already copied there."""
        return self._checkpoint(cpu_trees, best=self.best, progress=self.epoch_progress())

    def _checkpoint(self, cpu_trees: tuple[dict, dict] | None, *, best: dict | None, progress: EpochProgress) -> dict:
        trees = cpu_trees or (to_device(self.params, "cpu"), to_device(self.state, "cpu"))
        return build_checkpoint(self.weights_file(best or {}, trees), opt_state=to_device(self.opt_state, "cpu"),
                                epoch=self.epoch, step=self.global_step, batch_in_epoch=self.batch_in_epoch,
                                progress=progress, opts=self.opts, world=self.world, device=self.device)

    def restore(self, ckpt: dict, best: dict | None = None) -> None:
        """Continues from the checkpoint ``ckpt``; ``best`` is the best epoch's checkpoint, when there is one."""
        self.params = to_device(ckpt["params"], self.device)
        self.state = to_device(ckpt["state"], self.device)
        self.opt_state = to_device(ckpt["opt_state"], self.device)
        self.epoch = ckpt["epoch"]
        self.progress = EpochProgress(**ckpt["epoch_progress"])
        # Positions count this run's batches: a run saved with N processes may resume with M.
        self.batch_in_epoch = ckpt["batch_in_epoch"] * ckpt["world"] // self.world
        self.global_step = self.epoch * self.batches + self.batch_in_epoch
        self.best = ckpt["metrics"] or None
        if best is not None:
            self.best_weights = trees_to_evaluate(best["params"], best["state"], best["opt_state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.loss_sum, self.correct, self.seen = self._running_sums(self.progress)

    def _running_sums(self, carried: EpochProgress) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This process's running training sums (loss, right answers, images) of an epoch into which a checkpoint
        carried ``carried``: held by rank 0, so that the sum across processes at the epoch's end counts them once
        (the loss, a mean over the processes, times their number)."""
        carried = carried if self.rank == 0 else EpochProgress()
        return (torch.tensor(carried.loss * self.world, device=self.device),
                torch.tensor(carried.correct, dtype=torch.long, device=self.device), carried.seen)

    def epoch_progress(self) -> EpochProgress:
        """The epoch's training sums over all processes so far, as rank 0 knows them: exact with one process and
        once the epoch's batches are trained; mid-epoch with several, the others' share of the batches trained
        since the checkpoint is taken to be rank 0's."""
        if self.progress.trained:
            return self.progress
        loss, correct = self.loss_sum.item(), self.correct.item()
        if self.world == 1:
            return EpochProgress(loss, correct, self.seen)
        c, w = self.progress, self.world  # rank 0's sums hold what was carried in (the loss times w)
        return EpochProgress(c.loss + (loss - c.loss * w), c.correct + (correct - c.correct) * w,
                             c.seen + (self.seen - c.seen) * w)

    def weights_file(self, best: dict, trees: tuple[dict, dict]) -> Weights:
        """The inference weights ``trees`` = (params, state) of the epoch whose metrics are ``best``, as
        ``weights.pkl`` holds them."""
        params, state = trees
        return Weights(self.cfg, params, state, list(self.dataset.classes), self.dataset.preprocess,
                       self.dataset.split, dict(best))

    # -- loop ----------------------------------------------------------------------------------------------
    def make_step(self):
        """The training step of this run's options and device policy."""
        opts = self.opts
        return build_step(self.cfg, self.optimizer, self.policy, label_smoothing=opts.label_smoothing,
                          head_only=opts.freeze_backbone, reduce_grads=self.reduce_grads, bn_reduce=self.bn_reduce,
                          ema_decay=opts.ema, ema_warmup=opts.ema_warmup, clip_grad=opts.clip_grad)

    def trees_to_evaluate(self) -> tuple[dict, dict]:
        """The (params, state) that validation, best.ckpt's weights and weights.pkl use: the EMA's when kept."""
        return trees_to_evaluate(self.params, self.state, self.opt_state)

    def run(self) -> Iterator:
        """Trains from ``self.epoch``/``self.batch_in_epoch`` to ``opts.epochs``, yielding events. An epoch's
        end is owed (``progress.trained``) until the consumer has handled its last event (its metrics line), so that
        a run stopped anywhere before (``checkpoint()``) trains, validates and hands over what is left on resume."""
        step = self.make_step()
        opts, policy = self.opts, self.policy
        yield StartEvent(self.epoch, opts.epochs, self.batches, str(self.device), policy.describe(), policy.compiled,
                         len(self.skipped))
        while self.epoch < opts.epochs or self.progress.trained:
            t0 = time.perf_counter()
            carried = self.progress.seen  # images the checkpoint carried into this epoch
            waited = 0.0 if self.progress.trained else (yield from self.train_epoch(step, t0))
            train_seconds = max(time.perf_counter() - t0, 1e-9)
            yield from self.end_epoch(t0, {"img_per_s": (self.progress.seen - carried) / train_seconds,
                                           "data_wait": waited / train_seconds})

    def train_epoch(self, step, t0: float) -> Iterator[StepEvent]:
        """Trains the epoch's remaining batches, then counts it trained, its metrics summed across processes into
        ``self.progress``. Returns the seconds spent waiting for batches."""
        opts, policy = self.opts, self.policy
        first_seen, last_report = self.seen, t0
        batches = batch_lib.batches(
            self.dataset.train, self.dataset.preprocess, batch_size=opts.batch_size, train=True,
            augment=augmentation(opts), num_classes=len(self.dataset.classes), device=self.device,
            seed=opts.seed, epoch=self.epoch,
            start=self.batch_in_epoch, workers=opts.workers, shard=(self.rank, self.world),
            channels_last=policy.channels_last,
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
            params, state, opt_state, metrics = step(self.params, self.state, self.opt_state, (batch.x, batch.y),
                                                     torch.tensor(lr, device=self.device))
            # One assignment: a checkpoint sees the step entirely or not at all.
            (self.params, self.state, self.opt_state, self.batch_in_epoch, self.global_step, self.loss_sum,
             self.correct, self.seen) = (params, state, opt_state, self.batch_in_epoch + 1, self.global_step + 1,
                                         self.loss_sum + metrics["loss"], self.correct + metrics["correct"],
                                         self.seen + len(batch.y))
            now = time.perf_counter()
            if now - last_report > 0.5 or self.batch_in_epoch == self.batches:
                last_report = now
                mean_loss = self.loss_sum.item() / max(1, self.seen // opts.batch_size)
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(self.epoch + 1, self.batch_in_epoch)
                yield StepEvent(self.epoch + 1, self.batch_in_epoch, self.batches, mean_loss,
                                self.correct.item() / max(1, self.seen), (self.seen - first_seen) / (now - t0), lr,
                                waited / (now - t0))
        totals = self.summed_across_ranks()
        if self.dist.active:
            distributed.check_in_sync(self.params, self.dist)
        if not math.isfinite(totals.loss):
            raise NonFiniteLoss(self.epoch + 1, self.batch_in_epoch)
        self.epoch, self.batch_in_epoch, self.progress = self.epoch + 1, 0, totals  # one assignment, as above
        return waited

    def summed_across_ranks(self) -> EpochProgress:
        """The epoch's training sums over all processes, its batches all trained (a collective when distributed)."""
        if not self.dist.active:
            return EpochProgress(self.loss_sum.item(), self.correct.item(), self.seen, trained=True)
        totals = distributed.reduce_sum(torch.stack([self.loss_sum, self.correct.double(), torch.tensor(
            float(self.seen), device=self.device, dtype=torch.float64)]).double())
        return EpochProgress(totals[0].item() / self.world, int(totals[1].item()), int(totals[2].item()), trained=True)

    def end_epoch(self, t0: float, timing: dict) -> Iterator:
        """Validates the epoch just trained, hands over its files (rank 0) and its metrics line, then counts it
        recorded."""
        opts, done, epoch = self.opts, self.progress, self.epoch
        val = self.validate(self.dataset.val, *self.trees_to_evaluate())
        self.skipped.update(val["skipped"])
        metrics = {
            "epoch": epoch,
            "train_loss": done.loss / max(1, done.seen // (opts.batch_size * self.world)),
            "train_top1": done.correct / max(1, done.seen),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "lr": self.schedule(self.global_step - 1),
            "img_per_s": timing["img_per_s"],
            "seconds": time.perf_counter() - t0,
            "data_wait": timing["data_wait"],
            "skipped_files": len(self.skipped),
            "step": self.global_step,
        }
        if opts.ema:
            metrics["val_weights"] = "ema"
        improved = self.best is None or (val["top1"], -val["loss"]) > (self.best["val_top1"], -self.best["val_loss"])
        cpu_trees = (to_device(self.params, "cpu"), to_device(self.state, "cpu"))  # one copy for all uses
        best, best_weights = self.best, self.best_weights
        if improved:
            best, best_weights = dict(metrics), (to_device(self.trees_to_evaluate(), "cpu") if opts.ema else cpu_trees)
        if self.rank == 0:
            recorded = self._checkpoint(cpu_trees, best=best, progress=EpochProgress())
            yield CheckpointEvent(recorded, self.weights_file(best, best_weights) if improved else None)
        if epoch == opts.epochs and self.dataset.test is not None:
            metrics.update(self.test_best(best, best_weights))
        yield EpochEvent(metrics, improved)
        fresh = EpochProgress()
        # One assignment: a checkpoint sees the epoch recorded entirely or not at all.
        (self.best, self.best_weights, self.progress, (self.loss_sum, self.correct, self.seen)) = (
            best, best_weights, fresh, self._running_sums(fresh))

    def validate(self, source, params=None, state=None) -> dict:
        """Metrics on ``source``, each process evaluating its shard and the counts summed."""
        return evaluate(self.cfg, self.params if params is None else params,
                        self.state if state is None else state, source, self.dataset.preprocess,
                        batch_size=max(self.opts.batch_size, 128), policy=self.eval_policy, workers=self.opts.workers,
                        shard=(self.rank, self.world), reduce=distributed.reduce_sum if self.dist.active else None)

    def test_best(self, best: dict, trees: tuple[dict, dict]) -> dict:
        """Test-set metrics of the best epoch's weights ``trees``, ``best`` its metrics (the test set never picks
        the epoch)."""
        params, state = (to_device(t, self.device) for t in trees)
        result = self.validate(self.dataset.test, params, state)
        return {"test_top1": result["top1"], "test_top5": result["top5"], "test_loss": result["loss"],
                "test_of_epoch": best["epoch"]}


def augmentation(opts: TrainOptions) -> Augment | None:
    """What is done to the training batches (None: nothing)."""
    spec = Augment(crop_flip=opts.augment != "none", crop_scale=opts.crop_scale, auto_augment=opts.auto_augment,
                   reprob=opts.reprob, mixup=opts.mixup, cutmix=opts.cutmix)
    return None if spec == Augment(crop_flip=False, crop_scale=opts.crop_scale) else spec


def trees_to_evaluate(params: dict, state: dict, opt_state: dict) -> tuple[dict, dict]:
    """(params, state) to evaluate: the weight EMA kept in ``opt_state``, else ``params`` and ``state``."""
    return averaged(opt_state) or (params, state)


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, batch: int):
        super().__init__(f"the loss became NaN or infinite (epoch {epoch}, batch {batch}); lower --lr or check "
                         f"the data. The last good checkpoint is kept.")
